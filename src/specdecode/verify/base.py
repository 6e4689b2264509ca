"""The verifier contract: a pure function from (draft tree, target logits) to a verdict.

Terms, for one verification step over a tree below the root (the last committed token):
- *accepted* tokens: draft nodes on the path the verifier keeps, root's child first;
- the *recovered* token: drawn by the verifier from the target after a rejection (from the residual
  distribution, so that the overall output keeps the target's distribution);
- the *bonus* token: drawn from the target's distribution after the last node of the path when the
  verifier rejected nothing along it (no draft left below, or the draft ran out).
Every step therefore emits `len(path) + 1` tokens, at least one, which is why speculation never
yields fewer tokens per target forward than plain decoding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from specdecode.config import SamplingParams
from specdecode.tree import DraftTree, SiblingDraws


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one draft tree."""

    path: list[int]  # accepted node indices, from the root's child down
    tokens: list[int]  # the accepted tokens, then the recovered or bonus token
    num_draft_nodes: int  # how many nodes the tree had
    bonus: bool  # True when the last token is a bonus token, False when recovered

    @property
    def num_accepted(self) -> int:
        return len(self.path)

    @property
    def next_token(self) -> int:
        return self.tokens[-1]


class Verifier(ABC):
    """Decides which drafted tokens to keep, given the target's logits at every node."""

    name: ClassVar[str]
    #: Whether, at temperature > 0, the verifier refuses drafts without `draft_probs` (point-mass
    #: proposals from deterministic drafters and tree shapes).
    requires_draft_probs: ClassVar[bool] = False
    #: Whether the verifier handles branching trees (False: chains only).
    supports_trees: ClassVar[bool] = False
    #: Whether the output keeps the target's distribution (at temperature 0: is exact).
    lossless: ClassVar[bool] = True
    #: At temperature > 0, the ways of drawing siblings under which it is lossless (a chain has
    #: one child per node and satisfies any of them).
    lossless_for: ClassVar[frozenset[SiblingDraws]] = frozenset(
        {SiblingDraws.DETERMINISTIC, SiblingDraws.INDEPENDENT}
    )

    @abstractmethod
    def verify(
        self,
        tree: DraftTree,
        target_logits: torch.Tensor,  # [N+1, V]: row 0 after the root, row i+1 after node i
        sampling: SamplingParams,
        rng: torch.Generator | None,
    ) -> Verdict:
        """Pick the accepted path and the target's own next token. No model calls, no state."""
