"""Delayed expansion: a single drafted path for the first `delay` tokens, then branching without
replacement below it (after Dynamic Delayed Tree Expansion, which finds that multi-draft
verification gains most when the tree branches deeper rather than at the root). The first tokens
are the likeliest to be accepted, so branching there spends nodes on alternatives rarely needed."""

from __future__ import annotations

from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget
from specdecode.trees.without_replacement import WithoutReplacementTree


class DelayedTree(WithoutReplacementTree):
    name = "delayed"

    def __init__(self, delay: int = 2) -> None:
        if delay < 1:
            raise SpecDecodeError(f"the delayed tree's delay must be at least 1, got {delay}")
        self.delay = delay

    def width_at(self, depth: int, budget: Budget) -> int:
        return 1 if depth < self.delay else budget.max_width
