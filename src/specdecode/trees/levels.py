"""Growing a tree one level at a time: every node of a level gets its children, as many as the
level's width and the node budget allow, then the new level is fed to the drafter in one call.
Static, without-replacement and delayed trees differ only in which children and how many."""

from __future__ import annotations

from abc import abstractmethod

import torch

from specdecode.config import SamplingParams
from specdecode.tree import Budget, DraftTree
from specdecode.trees.base import Expander, PartialTree, TreeShape


class LevelByLevel(TreeShape):
    @abstractmethod
    def children(
        self, probs: torch.Tensor, count: int, sampling: SamplingParams, rng: torch.Generator | None
    ) -> list[int]:
        """Up to `count` child tokens for a node whose draft distribution is `probs` [V]."""

    def width_at(self, depth: int, budget: Budget) -> int:
        """Children per node at tree depth `depth + 1` (the root's children: depth 0)."""
        return budget.max_width

    def grow(
        self,
        root_logits: torch.Tensor,
        expander: Expander,
        budget: Budget,
        sampling: SamplingParams,
        rng: torch.Generator | None,
    ) -> DraftTree:
        tree = PartialTree(root_logits, expander, sampling)
        max_nodes = budget.max_nodes or 0
        frontier = [-1]
        for depth in range(budget.max_depth):
            level: list[int] = []
            for parent in frontier:
                room = min(self.width_at(depth, budget), max_nodes - len(tree))
                if room <= 0:
                    break
                for token in self.children(tree.dist[parent], room, sampling, rng):
                    level.append(tree.add(parent, token))
            if not level:
                break
            if depth + 1 < budget.max_depth and len(tree) < max_nodes:
                tree.feed(level)
            frontier = level
        return tree.finish(with_probs=self.sampled and not sampling.greedy)
