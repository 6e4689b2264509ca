"""Recursive rejection sampling for siblings drawn without replacement (Recursive Speculative
Decoding).

Jeon et al., "Recursive Speculative Decoding: Accelerating LLM Inference via Sampling Without
Replacement" (2024).

Siblings `x_1..x_k` are distinct draws from the draft distribution `q` of their parent: `x_1` from
`q`, `x_2` from `q` renormalised without `x_1`, and so on (the `without-replacement` and
`delayed` trees). At a node with target distribution `p`, `x_i` is *accepted* with probability
`min(1, p(x_i) / q_i(x_i))`, where `q_i` is `q` without the earlier siblings; on rejection `p`
becomes `norm(max(p - q_i, 0))` and `q_{i+1}` is `q_i` without `x_i`, renormalised. All
rejected: a *recovered* token from the last residual; no children: the *bonus* token from `p`.

Guarantee: lossless for such trees (and for deterministic drafts, taken as point masses, where it
is the same rule as `specinfer`). Unlike drawing with replacement, a rejected token is never
proposed again at the same node, which is why it accepts more per sibling.
"""

from __future__ import annotations

import torch

from specdecode.tree import DraftTree, SiblingDraws
from specdecode.verify.specinfer import SpecInferVerifier, draft_row


class RecursiveRejectionVerifier(SpecInferVerifier):
    name = "rrs-without-replacement"
    lossless_for = frozenset({SiblingDraws.DETERMINISTIC, SiblingDraws.WITHOUT_REPLACEMENT})

    def proposal_for(
        self, tree: DraftTree, child: int, previous: torch.Tensor | None, vocab_size: int
    ) -> torch.Tensor:  # [V]
        if previous is None or tree.draft_probs is None:
            return draft_row(tree, child, vocab_size)
        return previous  # the parent's q, without the siblings already rejected

    def after_rejection(self, proposal: torch.Tensor, token: int) -> torch.Tensor | None:
        without = proposal.clone()
        without[token] = 0.0
        total = float(without.sum())
        return without / total if total > 0 else None
