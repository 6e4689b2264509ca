"""Independent drafts: `max_width` sequences, each drawn from the draft model on its own (so their
first tokens may repeat), hung below the root as separate branches; SpecInfer's multi-draft setting
(Miao et al., 2024), verified by its multi-round rejection sampling (`specinfer`) or SpecTr's
selection. At temperature 0 the branches start from the top distinct tokens and continue
greedily."""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.sampling import sample_from
from specdecode.tree import Budget, DraftTree, SiblingDraws
from specdecode.trees.base import Expander, PartialTree, TreeShape, top_children


class IidTree(TreeShape):
    name = "iid"
    siblings = SiblingDraws.INDEPENDENT

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
        drafts = min(budget.max_width, max_nodes)
        if sampling.greedy:
            heads = top_children(tree.dist[-1], drafts)
        else:
            heads = sample_from(tree.dist[-1].expand(drafts, -1), rng).tolist()
        tips = [tree.add(-1, token) for token in heads]
        for _ in range(1, budget.max_depth):
            tips = tips[: max_nodes - len(tree)]
            if not tips:
                break
            tree.feed(tips)
            if sampling.greedy:
                tokens = [int(tree.dist[tip].argmax()) for tip in tips]
            else:
                tokens = sample_from(torch.stack([tree.dist[tip] for tip in tips]), rng).tolist()
            tips = [tree.add(tip, token) for tip, token in zip(tips, tokens, strict=True)]
        return tree.finish(with_probs=not sampling.greedy)
