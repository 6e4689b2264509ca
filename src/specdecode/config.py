"""Configuration dataclasses: how to sample, and how to speculate.

Both are flat, frozen and validated on construction, so a bad value fails before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from specdecode.errors import SpecDecodeError


@dataclass(frozen=True)
class SamplingParams:
    """How the target's next-token distribution is shaped and sampled.

    temperature == 0 means greedy decoding (argmax). top_k == 0 and top_p == 1.0 disable those
    filters. The same transformation is applied to the target's and the drafter's logits, so the
    verifier compares like with like.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise SpecDecodeError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SpecDecodeError(f"top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SpecDecodeError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise SpecDecodeError(f"max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise SpecDecodeError(
                "a stop string (--stop) must not be empty: it would be found before any output"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


#: The controller of a chain when none is named: the benchmark's tables (prompt lookup and draft
#: model, torch and llama.cpp backends) favour it for prompt lookup, and for a draft model it is
#: level with the heuristic one (1.65x against 1.65x on the torch reference suite).
DEFAULT_CONTROLLER = "cost-aware"
#: The controller of a tree when none is named: cost-aware plans chains only.
DEFAULT_TREE_CONTROLLER = "heuristic"
#: The controller of plain decoding (drafter `none`), which drafts nothing whatever it says: the
#: heuristic one, as before, since cost-aware would measure a cost curve for nothing.
PLAIN_DECODING_CONTROLLER = "heuristic"


@dataclass(frozen=True)
class SpecConfig:
    """Which drafter, verifier and controller to use, and their parameters.

    Names are looked up in the registries of `specdecode.drafters`, `specdecode.verify` and
    `specdecode.control`. `verifier=None` picks the exact one for the sampling mode: `greedy` at
    temperature 0; otherwise `rejection` for chains and the tree shape's own for trees.
    `controller=None` picks `cost-aware` for chains (the benchmark's tables favour it for prompt
    lookup; for draft models it is level) and `heuristic` for trees (cost-aware plans chains only)
    and for plain decoding (drafter `none`, which drafts nothing); the
    field holds the chosen name once constructed.

    `num_draft_tokens` is the draft length of the first step; the adaptive controllers
    (heuristic, cost-aware) then move it between 1 and `max_draft_tokens` (cost-aware also to 0,
    plain decoding), and the fixed controller keeps it.
    """

    drafter: str = "prompt-lookup"
    verifier: str | None = None
    controller: str | None = None
    num_draft_tokens: int = 6
    max_draft_tokens: int = 16
    drafter_options: dict[str, Any] = field(default_factory=dict)
    controller_options: dict[str, Any] = field(default_factory=dict)
    #: Draft shape: "chain", or a tree of `specdecode.trees` grown `tree_width` wide, at most
    #: `tree_nodes` nodes (default: draft length x width), as deep as the controller's length.
    tree: str = "chain"
    tree_width: int = 2
    tree_nodes: int | None = None
    tree_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.controller is None:
            from specdecode.trees import CHAIN  # not at the top: trees import this module

            if self.drafter == "none":
                chosen = PLAIN_DECODING_CONTROLLER
            elif self.tree == CHAIN:
                chosen = DEFAULT_CONTROLLER
            else:
                chosen = DEFAULT_TREE_CONTROLLER
            object.__setattr__(self, "controller", chosen)
        if self.num_draft_tokens < 1:
            raise SpecDecodeError(
                f"the draft length must be at least 1, got {self.num_draft_tokens} "
                "(use drafter 'none' for plain decoding)"
            )
        if self.tree_width < 1 or (self.tree_nodes is not None and self.tree_nodes < 1):
            raise SpecDecodeError(
                f"a tree needs a width and node budget of at least 1, got width "
                f"{self.tree_width}, nodes {self.tree_nodes}"
            )
        if self.max_draft_tokens < self.num_draft_tokens:
            raise SpecDecodeError(
                f"max draft tokens ({self.max_draft_tokens}) must be >= the initial draft length "
                f"({self.num_draft_tokens})"
            )
