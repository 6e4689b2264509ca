"""k-sequential draft selection (SpecTr).

Sun et al., "SpecTr: Fast Speculative Decoding via Optimal Transport" (NeurIPS 2023), its
K-SEQ selection, a valid transport plan from k i.i.d. drafts to the target.

At a node whose target distribution is `p`, the `k` children `x_1..x_k` are independent draws from
the same draft distribution `q` (the `iid` tree; a chain is `k = 1`). For a scale `rho` in [1, k],
let `beta = sum_x min(q(x), p(x) / rho)` and `gamma = (1 - (1 - beta)^k) / beta`. The children are
tried in order: `x_i` is *accepted* with probability `min(1, p(x_i) / (rho q(x_i)))`, and the walk
descends into it. A token `x` thus comes out of the acceptances with probability
`gamma min(q(x), p(x) / rho)`, which stays below `p(x)` as long as `gamma <= rho`; when all `k`
are rejected (probability `(1 - beta)^k`) the *recovered* token is drawn from what is left,
`norm(p - gamma min(q, p / rho))`, so the token at the node has exactly the law `p`. A node without
children emits the *bonus* token from `p`. `rho` is the smallest scale with `gamma <= rho`, found by
bisection (the larger `beta`, the more is accepted); with `k = 1` it is 1 and the rule is
Leviathan et al.'s rejection sampling.

Guarantee: lossless when the siblings are i.i.d. from their parent's draft distribution (`iid`
trees, chains). It needs that distribution: trees without `draft_probs` are refused at temperature
> 0. Unlike `specinfer`, the target is never reshaped between siblings, which is what lets
acceptance grow with `k` towards the optimal transport bound.
"""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.sampling import sample_from, shaped_probs
from specdecode.tree import DraftTree, SiblingDraws
from specdecode.verify.base import Verdict, Verifier
from specdecode.verify.specinfer import draft_row

_BISECTION_STEPS = 40


class SpecTrVerifier(Verifier):
    name = "spectr"
    requires_draft_probs = True
    supports_trees = True
    lossless_for = frozenset({SiblingDraws.INDEPENDENT})

    def verify(
        self,
        tree: DraftTree,
        target_logits: torch.Tensor,  # [N+1, V]
        sampling: SamplingParams,
        rng: torch.Generator | None,
    ) -> Verdict:
        target_probs = shaped_probs(target_logits, sampling)  # [N+1, V]
        draft_tokens = tree.tokens.tolist()
        path: list[int] = []
        slot = 0  # row of target_probs: 0 = the root, i + 1 = node i
        while True:
            probs = target_probs[slot]  # [V]
            children = tree.children[slot]
            if not children:
                token = int(sample_from(probs, rng))
                return Verdict(
                    path, [draft_tokens[n] for n in path] + [token], tree.num_nodes, True
                )
            # Siblings share their parent's distribution; the first child's row is it.
            proposal = draft_row(tree, children[0], probs.shape[-1])  # [V]
            rho = self.scale(probs, proposal, len(children))
            accepted = None
            for child in children:
                token = draft_tokens[child]
                if float(torch.rand((), generator=rng)) * rho * float(proposal[token]) < float(
                    probs[token]
                ):
                    accepted = child
                    break
            if accepted is None:
                token = int(sample_from(leftover(probs, proposal, rho, len(children)), rng))
                tokens = [draft_tokens[n] for n in path] + [token]
                return Verdict(path, tokens, tree.num_nodes, bonus=False)
            path.append(accepted)
            slot = accepted + 1

    def scale(self, probs: torch.Tensor, proposal: torch.Tensor, num_drafts: int) -> float:
        """The smallest `rho` in [1, k] with `gamma(rho) <= rho` (bisection; the upper end stays
        valid throughout, so the answer is valid even where it is not the smallest)."""
        if num_drafts == 1:
            return 1.0
        if _gamma(probs, proposal, 1.0, num_drafts) <= 1.0:
            return 1.0
        low, high = 1.0, float(num_drafts)
        for _ in range(_BISECTION_STEPS):
            middle = 0.5 * (low + high)
            if _gamma(probs, proposal, middle, num_drafts) <= middle:
                high = middle
            else:
                low = middle
        return high


def _gamma(probs: torch.Tensor, proposal: torch.Tensor, rho: float, num_drafts: int) -> float:
    """(1 - (1 - beta)^k) / beta: the expected number of draws K-SEQ makes, per unit of beta."""
    beta = float(torch.minimum(proposal, probs / rho).sum(dtype=torch.float64))
    if beta <= 0.0:
        return float(num_drafts)  # the limit as beta -> 0
    return (1.0 - (1.0 - min(beta, 1.0)) ** num_drafts) / beta


def leftover(
    probs: torch.Tensor, proposal: torch.Tensor, rho: float, num_drafts: int
) -> torch.Tensor:  # [V]
    """norm(p - gamma min(q, p / rho)): the target's mass that no accepted draft supplied."""
    accepted_mass = _gamma(probs, proposal, rho, num_drafts) * torch.minimum(proposal, probs / rho)
    rest = (probs - accepted_mass).clamp_(min=0.0)
    total = float(rest.sum())
    # Nothing left means every draw is accepted in exact arithmetic (p == q with k == 1).
    return rest / total if total > 0 else probs
