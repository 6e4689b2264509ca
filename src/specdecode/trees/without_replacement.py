"""Tree of draws without replacement: each node's `max_width` children are distinct tokens drawn
one after another from the draft distribution renormalised over those not drawn yet (Gumbel-top-k),
level by level within the node budget: the constant-branching trees of Recursive Speculative
Decoding (Jeon et al., 2024). Verify them with `rrs-without-replacement`, whose residuals follow
the same draws. At temperature 0 the children are the top tokens."""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.tree import SiblingDraws
from specdecode.trees.base import draw_without_replacement, top_children
from specdecode.trees.levels import LevelByLevel


class WithoutReplacementTree(LevelByLevel):
    name = "without-replacement"
    siblings = SiblingDraws.WITHOUT_REPLACEMENT
    sampling_verifier = "rrs-without-replacement"

    def children(
        self, probs: torch.Tensor, count: int, sampling: SamplingParams, rng: torch.Generator | None
    ) -> list[int]:
        if sampling.greedy:
            return top_children(probs, count)
        return draw_without_replacement(probs, count, rng)
