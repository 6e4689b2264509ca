"""The drafter contract.

A drafter proposes a `DraftTree` below the last committed token, within the controller's budget,
and hears the verdict afterwards. It never decides what is emitted: the verifier does, so a bad
drafter costs speed, never correctness.

Lifecycle per generation: `begin(prompt, sampling, rng)`, then per step `propose(context, budget)`
and `update(verdict)`; `reset()` forgets everything. `context` is the full token sequence so far
(prompt and accepted output, the last token being the root of the tree); drafters read it and never
modify it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from specdecode.backends.base import Backend
from specdecode.config import SamplingParams
from specdecode.tree import Budget, DraftTree
from specdecode.trees import TreeShape
from specdecode.verify.base import Verdict


@dataclass
class DrafterResources:
    """What the engine can hand a drafter when building it."""

    target: Backend
    draft_model: Backend | None = None
    #: How to shape the drafts (None: the drafter's own chain).
    tree: TreeShape | None = None


class Drafter(ABC):
    name: ClassVar[str]
    #: Model-free drafters (n-gram, lookup) need no second model.
    needs_draft_model: ClassVar[bool] = False
    #: Whether proposals carry `draft_probs` when sampling (False: point-mass proposals).
    samples_drafts: ClassVar[bool] = False
    #: Whether the drafter can grow trees of any `TreeShape` (False: chains only).
    supports_trees: ClassVar[bool] = False

    @classmethod
    def create(cls, options: dict[str, Any], resources: DrafterResources) -> Drafter:
        """Build from user options (a dict from the CLI or a methods file)."""
        return cls(**options)

    def begin(
        self, prompt: Sequence[int], sampling: SamplingParams, rng: torch.Generator | None
    ) -> None:
        """Start a new sequence."""

    @abstractmethod
    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        """Draft below `context[-1]` within `budget`. An empty tree is a valid proposal."""

    def update(self, verdict: Verdict) -> None:
        """Hear which drafts were accepted (for drafters that learn or keep state)."""

    def reset(self) -> None:
        """Forget all per-sequence state."""
