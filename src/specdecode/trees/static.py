"""Static tree: each node's children are the most likely tokens of the draft distribution,
`max_width` per node, level by level until the node budget is spent (the fixed top-k trees of
Medusa and SpecInfer's expansion). The children are chosen, not drawn: at temperature > 0 they
are point-mass proposals, which `specinfer` verifies exactly."""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.trees.base import top_children
from specdecode.trees.levels import LevelByLevel


class StaticTree(LevelByLevel):
    name = "static"

    def children(
        self, probs: torch.Tensor, count: int, sampling: SamplingParams, rng: torch.Generator | None
    ) -> list[int]:
        return top_children(probs, count)
