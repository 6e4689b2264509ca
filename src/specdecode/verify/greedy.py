"""Greedy verification: keep the longest drafted path that the target's argmax agrees with.

Guarantee: exact. At temperature 0 the emitted tokens are, token for token, those plain greedy
decoding of the target would produce (given the backend's logits at each position are the same in
a tree forward as in a one-token forward). Works for chains and trees: at each accepted node the
walk descends into the child whose token equals the target's argmax there, if any; the argmax at
the last accepted node is the bonus (no child matched a deeper draft... or none existed) or the
correction of a mismatched draft.
"""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.tree import DraftTree
from specdecode.verify.base import Verdict, Verifier


class GreedyVerifier(Verifier):
    name = "greedy"
    supports_trees = True

    def verify(
        self,
        tree: DraftTree,
        target_logits: torch.Tensor,  # [N+1, V]
        sampling: SamplingParams,
        rng: torch.Generator | None,
    ) -> Verdict:
        target_argmax = target_logits.argmax(dim=-1).tolist()  # [N+1]: row 0 is the root
        if tree.is_chain:
            matches = (tree.tokens == torch.tensor(target_argmax[:-1])).int()
            num_accepted = int(torch.cumprod(matches, dim=0).sum())
            path = list(range(num_accepted))
            bonus = num_accepted == tree.num_nodes
            return Verdict(
                path,
                tree.tokens[:num_accepted].tolist() + [target_argmax[num_accepted]],
                tree.num_nodes,
                bonus,
            )
        draft_tokens = tree.tokens.tolist()
        path: list[int] = []
        slot = 0  # row of target_logits for the current node (0 = root)
        while True:
            wanted = target_argmax[slot]
            children = tree.children[slot]
            match = next((c for c in children if draft_tokens[c] == wanted), None)
            if match is None:
                return Verdict(
                    path,
                    [draft_tokens[n] for n in path] + [wanted],
                    tree.num_nodes,
                    bonus=not children,
                )
            path.append(match)
            slot = match + 1
