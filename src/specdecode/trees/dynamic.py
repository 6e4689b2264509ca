"""Dynamic tree (EAGLE-2, Li et al., 2024): grow by expected acceptance, approximated by the
draft's own confidence. At each depth the `max_width` nodes with the highest cumulative draft
probability (product along their path) are expanded, each with its top `max_width` children;
finally the `max_nodes` nodes of highest cumulative probability are kept, which is a tree
because a child never scores above its parent. Children are chosen, not drawn (point masses at
temperature > 0)."""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.tree import Budget, DraftTree
from specdecode.trees.base import Expander, PartialTree, TreeShape, top_children


class DynamicTree(TreeShape):
    name = "dynamic"

    def grow(
        self,
        root_logits: torch.Tensor,
        expander: Expander,
        budget: Budget,
        sampling: SamplingParams,
        rng: torch.Generator | None,
    ) -> DraftTree:
        tree = PartialTree(root_logits, expander, sampling)
        width = budget.max_width
        frontier = [-1]
        for depth in range(budget.max_depth):
            level = [
                tree.add(parent, token)
                for parent in frontier
                for token in top_children(tree.dist[parent], width)
            ]
            if not level:
                break
            frontier = sorted(level, key=lambda node: -tree.scores[node])[:width]
            if depth + 1 < budget.max_depth:
                tree.feed(frontier)
        # Ties go to the earlier node, so a parent always ranks before its child.
        ranked = sorted(range(len(tree)), key=lambda node: (-tree.scores[node], node))
        return tree.finish(keep=ranked[: budget.max_nodes])
