"""What every head's checkpoint shares: a config.json and one safetensors file, written whole or
not at all and read back with one-line errors; and the configuration of heads on the target's last
hidden state (Medusa's and Hydra's), with the check that they fit the target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specdecode.errors import SpecDecodeError
from specdecode.models.config import TransformerConfig

CONFIG_FILE = "config.json"


def write_checkpoint(
    directory: Path, config: dict[str, Any], weights_file: str, tensors: dict[str, torch.Tensor]
) -> None:
    """config.json and the weights, each written under a temporary name and then renamed, so an
    interrupted save never leaves a truncated head."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / (weights_file + ".partial")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(weights), {"format": "pt"})
    settings = directory / (CONFIG_FILE + ".partial")
    settings.write_text(json.dumps(config, indent=2) + "\n")
    weights.replace(directory / weights_file)
    settings.replace(directory / CONFIG_FILE)


def read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecDecodeError(f"{directory} is not a draft head: it has no {CONFIG_FILE}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecDecodeError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise SpecDecodeError(f"{path} is not a model config (a JSON object)")
    return config


def read_weights(directory: Path, weights_file: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = directory / weights_file
    if not weights.is_file():
        raise SpecDecodeError(f"the head {directory} has no {weights_file}")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise SpecDecodeError(
            f"the head's weights {weights} are damaged or truncated ({exc}): train it again"
        ) from None


def refuse_family(target: TransformerConfig) -> None:
    """Heads on the last state are built for Llama / Qwen2 targets (Gemma's final norm and
    embedding scale differ, and batched self-distillation is written for Llama's layers)."""
    if target.family != "llama":
        raise SpecDecodeError(
            f"Medusa, Hydra and Kangaroo heads are built for Llama / Qwen2 targets, not "
            f"{target.family}"
        )


@dataclass(frozen=True)
class StateHeadsConfig:
    """K heads on the target's last hidden state (Medusa's, Hydra's): their shape and the target
    they were made for."""

    hidden_size: int
    vocab_size: int  # the target's
    num_heads: int = 4
    num_layers: int = 1
    draft_vocab: tuple[int, ...] = ()  # target ids the output layers score (training picks them)
    base_model: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.num_layers < 1 or self.hidden_size < 1:
            raise SpecDecodeError("draft heads need at least one head of at least one layer")
        if any(not 0 <= t < self.vocab_size for t in self.draft_vocab):
            raise SpecDecodeError(
                f"the heads' draft vocabulary must be target ids below {self.vocab_size}"
            )
        if len(set(self.draft_vocab)) != len(self.draft_vocab):
            raise SpecDecodeError("the heads' draft vocabulary lists a token twice")

    def check_target(self, target: TransformerConfig, source: str) -> None:
        """Refuse, in one line naming the mismatch, heads made for another model."""
        refuse_family(target)
        if self.hidden_size != target.hidden_size:
            raise SpecDecodeError(
                f"the heads {source} read hidden states of size {self.hidden_size}, but the "
                f"target's are {target.hidden_size}: they were trained for another model"
            )
        if self.vocab_size != target.vocab_size:
            raise SpecDecodeError(
                f"the heads {source} predict over a vocabulary of {self.vocab_size} tokens, the "
                f"target's has {target.vocab_size}: they were trained for another model"
            )

    def common_json(self) -> dict[str, Any]:
        return {
            "base_model_name_or_path": self.base_model,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "specdecode": {"draft_vocab": list(self.draft_vocab), **self.provenance},
        }

    @classmethod
    def from_json(
        cls, raw: dict[str, Any], num_heads: int, num_layers: int, path: Path
    ) -> StateHeadsConfig:
        """From a config.json; sizes it does not give (the Medusa repository's configs name only
        the heads) are filled in by `check_target`'s caller from the target."""
        try:
            extra = dict(raw.get("specdecode") or {})
            vocab = extra.pop("draft_vocab", range(int(raw["vocab_size"])))
            return cls(
                hidden_size=int(raw["hidden_size"]),
                vocab_size=int(raw["vocab_size"]),
                num_heads=int(num_heads),
                num_layers=int(num_layers),
                draft_vocab=tuple(int(t) for t in vocab),
                base_model=str(raw.get("base_model_name_or_path", "")),
                provenance=extra,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecDecodeError(f"{path} is not a valid head config: {exc!r}") from None
