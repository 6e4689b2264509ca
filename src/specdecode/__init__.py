"""specdecode: lossless speculative decoding behind a few small interfaces.

The public API: `load()` / `SpecDecoder` to load a model and generate; `SamplingParams` and
`SpecConfig` to configure sampling and speculation; `Engine` and the `DraftTree` / `Verdict`
contracts for building new drafters, verifiers and controllers.
"""

from specdecode.api import DEFAULT_MODEL, GenerationResult, SpecDecoder, load
from specdecode.config import SamplingParams, SpecConfig
from specdecode.engine import Engine, GenerationStats, StepOutput
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget, DraftTree
from specdecode.verify import Verdict

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "Budget",
    "DraftTree",
    "Engine",
    "GenerationResult",
    "GenerationStats",
    "SamplingParams",
    "SpecConfig",
    "SpecDecodeError",
    "SpecDecoder",
    "StepOutput",
    "Verdict",
    "load",
]
