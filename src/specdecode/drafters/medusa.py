"""`medusa`: drafts with Medusa-1 heads (see `specdecode.heads.medusa`) on the target's last hidden
state, which the target computes anyway while verifying (`last_state.py` keeps it).

Head `k` predicts the token `k+1` places below the root, so one pass of the heads drafts a whole
chain of up to K tokens, or the distribution at every depth of a tree (the same at every node of
a depth: the heads never see the tokens they drafted). Chains take each head's argmax (greedy,
with the head's own probability as the confidence forecast) or a draw from its shaped
distribution (sampling, carrying `draft_probs`); trees are grown by any tree shape, at most K
deep.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from specdecode.drafters.last_state import LastStateDrafter
from specdecode.heads.medusa import WEIGHTS_FILE, load_heads
from specdecode.sampling import sample_from, shaped_probs
from specdecode.tree import Budget, DraftTree


class MedusaDrafter(LastStateDrafter):
    name = "medusa"
    weights_file = WEIGHTS_FILE

    @classmethod
    def read_heads(cls, directory: Path, config, dtype: torch.dtype, device) -> torch.nn.Module:
        return load_heads(directory, config, dtype=dtype, device=device)

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        room = self.target.max_context - len(context) - 1
        depth = min(budget.max_depth, self.heads.cfg.num_heads, room)
        if depth <= 0 or self._state is None:
            return DraftTree.empty()
        logits = self.heads(self.normed_state())[:depth, 0].float().cpu()  # [depth, draft_vocab]
        if self.tree is not None:
            by_depth = self.full_vocab(logits, float("-inf"))  # [depth, V]
            budget = Budget(depth, budget.max_width, budget.max_nodes)
            expander = _DepthExpander(by_depth)
            return self.tree.grow(by_depth[0], expander, budget, self.sampling, self.rng)
        if self.sampling.greedy:
            draft_ids = logits.argmax(-1)  # [depth]
            confidence = torch.softmax(logits, dim=-1).gather(1, draft_ids[:, None])[:, 0]
            return DraftTree.chain(self.target_ids[draft_ids].tolist(), confidence=confidence)
        dists = shaped_probs(logits, self.sampling)  # [depth, draft_vocab]
        draft_ids = [int(sample_from(dist, self.rng)) for dist in dists]
        return DraftTree.chain(self.target_ids[draft_ids].tolist(), self.full_vocab(dists, 0.0))


class _DepthExpander:
    """A node's children are drawn from the head of the next depth, whatever the path."""

    def __init__(self, by_depth: torch.Tensor) -> None:  # [K, V] logits
        self.by_depth = by_depth
        self.depth: dict[int, int] = {-1: 0}

    def expand(self, nodes: list[int], parents: list[int], tokens: list[int]) -> torch.Tensor:
        rows = []
        for node in nodes:
            self.depth[node] = self.depth[parents[node]] + 1
            # Below the last head's depth nothing is drafted (the budget stops there): the last
            # head stands in for a distribution no node is drawn from.
            rows.append(min(self.depth[node], self.by_depth.shape[0] - 1))
        return self.by_depth[rows]
