"""The drafter contract.

A drafter proposes a `DraftTree` below the last committed token, within the controller's budget,
and hears the verdict afterwards. It never decides what is emitted: the verifier does, so a bad
drafter costs speed, never correctness.

Lifecycle per generation: `begin(prompt, sampling, rng, target)`, then per step
`propose(context, budget)` and `update(verdict, target)`, then `end(context)`; `reset()` forgets
everything. `context` is
the full token sequence so far (prompt and accepted output, the last token being the root of the
tree); drafters read it and never modify it.

`target` is what the target's forward computed that a drafter may read: at `begin`, the prefill of
the prompt (all its tokens but the last); at `update`, the verification forward (the root, then
the tree's nodes). A drafter that reads hidden states names the layers in `hidden_layers` when it
is built, and the backend captures them during the forwards it runs anyway; drafters that name
none cost the target nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from specdecode.backends.base import Backend
from specdecode.config import SamplingParams
from specdecode.tree import Budget, DraftTree
from specdecode.trees import TreeShape
from specdecode.verify.base import Verdict


@dataclass(frozen=True)
class TargetOutput:
    """What one target forward computed, for drafters that read it (never modify it).

    Rows are the forward's tokens in order: at prefill the prompt's tokens but the last; at
    verification the root (the last committed token) then each tree node. Row `r`'s hidden state
    is the target's state *at* that token, from which its next-token logits come.
    """

    # [T, V] float32 next-token logits; None at prefill, which computes none
    logits: torch.Tensor | None = None
    # [T, len(hidden_layers), hidden] the hidden state entering each layer the drafter named
    # (Hugging Face's `hidden_states[layer]`); None when it named none
    hidden: torch.Tensor | None = None
    # [T] int64 the forward's input tokens, whoever drafted them (a drafter that combines
    # others proposes for them); None where the caller did not say
    tokens: torch.Tensor | None = None


NO_TARGET_OUTPUT = TargetOutput()


@dataclass
class DrafterResources:
    """What the engine can hand a drafter when building it."""

    target: Backend
    draft_model: Backend | None = None
    #: How to shape the drafts (None: the drafter's own chain).
    tree: TreeShape | None = None
    #: The target's registry name or path, where a drafter looks up the model's own trained head.
    model_name: str = ""
    #: State a drafter keeps across requests, for as long as the engine lives (the suffix
    #: drafter's index of earlier outputs), by a key of the drafter's own.
    shared: dict[str, Any] = field(default_factory=dict)
    #: The tokenizer's fingerprint ("" where unknown), for state saved to a file.
    vocabulary: str = ""


class Drafter(ABC):
    name: ClassVar[str]
    #: Model-free drafters (n-gram, lookup) need no second model.
    needs_draft_model: ClassVar[bool] = False
    #: Whether proposals carry `draft_probs` when sampling (False: point-mass proposals).
    samples_drafts: ClassVar[bool] = False
    #: Whether the drafter can grow trees of any `TreeShape` (False: chains only).
    supports_trees: ClassVar[bool] = False
    #: Whether it drafts with part of the target's own layers (self-speculation), which only a
    #: backend that `supports_layer_plans` runs.
    runs_part_of_target: ClassVar[bool] = False
    #: The target layers whose hidden states the drafter reads (`TargetOutput.hidden`); set by a
    #: drafter that needs them when built, empty for those that read none.
    hidden_layers: tuple[int, ...] = ()
    #: Whether what the drafter keeps across requests (`DrafterResources.shared`) is the
    #: target's own statistics and never a request's text (token recycling's successor matrix),
    #: so that a benchmark may carry it across unrelated prompts without leaking an answer.
    keeps_model_statistics: ClassVar[bool] = False
    #: Whether `propose` calls no model and leaves nothing that misleads a later `update` when
    #: another drafter's proposal was verified instead, so that a drafter wrapping this one may
    #: consult it every step and draft something else (sam weighs its short copies against it).
    proposes_freely: ClassVar[bool] = False

    @classmethod
    def keeps_only_model_statistics(cls, options: dict[str, Any]) -> bool:
        """`keeps_model_statistics` for a drafter built with `options` (a drafter that wraps
        another answers for it)."""
        return cls.keeps_model_statistics

    @classmethod
    def create(cls, options: dict[str, Any], resources: DrafterResources) -> Drafter:
        """Build from user options (a dict from the CLI or a methods file)."""
        return cls(**options)

    def begin(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        rng: torch.Generator | None,
        target: TargetOutput = NO_TARGET_OUTPUT,
    ) -> None:
        """Start a new sequence; `target` is the prefill of the prompt (all its tokens but the
        last)."""

    @abstractmethod
    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        """Draft below `context[-1]` within `budget`. An empty tree is a valid proposal."""

    def update(self, verdict: Verdict, target: TargetOutput = NO_TARGET_OUTPUT) -> None:
        """Hear which drafts were accepted (for drafters that learn or keep state); `target` is
        the verification forward that decided it."""

    def end(self, context: Sequence[int]) -> None:
        """The sequence is over (finished, stopped or abandoned); `context` is its prompt and
        output. Drafters that learn across requests keep what they learned here."""

    def reset(self) -> None:
        """Forget all per-sequence state."""
