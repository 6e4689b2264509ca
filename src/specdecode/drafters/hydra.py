"""`hydra`: drafts with Hydra heads (see `specdecode.heads.hydra`) on the target's last hidden
state, which the target computes anyway while verifying (`last_state.py` keeps it).

Head `k` reads that state and the embeddings of the root (the token just committed) and of the
`k` tokens drafted above on the same path, so a chain runs the heads one after another, each on
the draft before, and a tree node's children come from the head of its depth over its own path.
Chains take each head's argmax (greedy, with its probability as the confidence forecast) or a draw
from its shaped distribution (sampling, carrying `draft_probs`); trees are grown by any tree
shape, at most K deep.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from specdecode.drafters.last_state import LastStateDrafter
from specdecode.heads.hydra import WEIGHTS_FILE, load_heads
from specdecode.sampling import sample_from, shaped_probs
from specdecode.tree import Budget, DraftTree


class HydraDrafter(LastStateDrafter):
    name = "hydra"
    weights_file = WEIGHTS_FILE

    @classmethod
    def read_heads(cls, directory: Path, config, dtype: torch.dtype, device) -> torch.nn.Module:
        return load_heads(directory, config, dtype=dtype, device=device)

    def _logits(self, normed: torch.Tensor, paths: list[list[int]]) -> torch.Tensor:
        """Draft logits after each path (root first, equal lengths): [n, draft_vocab] on the CPU."""
        ids = torch.tensor(paths, dtype=torch.long)  # [n, k+1]
        embeds = self.target.token_embeddings(ids.flatten()).view(*ids.shape, -1)
        k = ids.shape[1] - 1
        out = self.heads.logits(k, normed.expand(len(paths), -1), embeds.to(normed.dtype))
        return out.float().cpu()

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        room = self.target.max_context - len(context) - 1
        depth = min(budget.max_depth, self.heads.cfg.num_heads, room)
        if depth <= 0 or self._state is None:
            return DraftTree.empty()
        normed = self.normed_state()  # [1, H]
        root = int(context[-1])
        if self.tree is not None:
            expander = _PathExpander(self, normed, root)
            budget = Budget(depth, budget.max_width, budget.max_nodes)
            root_logits = self.full_vocab(self._logits(normed, [[root]])[0], float("-inf"))
            return self.tree.grow(root_logits, expander, budget, self.sampling, self.rng)
        path = [root]
        drafts: list[int] = []
        confidence: list[float] = []
        dists: list[torch.Tensor] = []
        for _ in range(depth):
            logits = self._logits(normed, [path])[0]  # [draft_vocab]
            if self.sampling.greedy:
                draft_id = int(logits.argmax())
                confidence.append(float(torch.softmax(logits, dim=-1)[draft_id]))
            else:
                dist = shaped_probs(logits, self.sampling)
                draft_id = int(sample_from(dist, self.rng))
                dists.append(dist)
            token = int(self.target_ids[draft_id])
            drafts.append(token)
            path.append(token)
        if self.sampling.greedy:
            return DraftTree.chain(drafts, confidence=torch.tensor(confidence))
        return DraftTree.chain(drafts, self.full_vocab(torch.stack(dists), 0.0))


class _PathExpander:
    """A node's children come from the head of its depth over the path down to it."""

    def __init__(self, drafter: HydraDrafter, normed: torch.Tensor, root: int) -> None:
        self.drafter = drafter
        self.normed = normed
        self.paths: dict[int, list[int]] = {-1: [root]}

    def expand(self, nodes: list[int], parents: list[int], tokens: list[int]) -> torch.Tensor:
        heads = self.drafter.heads.cfg.num_heads
        out = torch.empty(len(nodes), self.drafter.vocab_size)
        by_depth: dict[int, list[int]] = {}  # nodes of one depth share a head: one call each
        for row, node in enumerate(nodes):
            self.paths[node] = self.paths[parents[node]] + [tokens[node]]
            # Below the last head nothing is drafted (the budget stops there): the last head,
            # over the path's top, stands in for such a node.
            by_depth.setdefault(min(len(self.paths[node]), heads), []).append(row)
        for length, rows in by_depth.items():
            paths = [self.paths[nodes[row]][:length] for row in rows]
            out[rows] = self.drafter.full_vocab(
                self.drafter._logits(self.normed, paths), float("-inf")
            )
        return out
