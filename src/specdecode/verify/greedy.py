"""Greedy verification: keep the longest drafted path that the target's argmax agrees with.

Guarantee: exact. At temperature 0 the emitted tokens are, token for token, those plain greedy
decoding of the target would produce, given that the backend computes a position's logits the
same way in a multi-token forward as in a one-token forward (the torch backend does, bit for bit,
for chains in bfloat16; see its tests).

Works for chains and trees: from the root, the walk descends into the child whose token equals
the target's argmax, while there is one. The argmax where it stops is emitted too: a bonus token
at a leaf, the target's correction elsewhere.
"""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.tree import DraftTree
from specdecode.verify.base import Verdict, Verifier


class GreedyVerifier(Verifier):
    name = "greedy"
    supports_trees = True
    lossless_for = frozenset()  # it takes the argmax: exact at temperature 0, nowhere else

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
