"""No drafting: every step is one plain autoregressive forward of the target.

This is the baseline every speed-up is measured against, run through the same engine so that the
comparison isolates speculation and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

from specdecode.drafters.base import Drafter
from specdecode.tree import Budget, DraftTree


class NoDrafter(Drafter):
    name = "none"

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        return DraftTree.empty()
