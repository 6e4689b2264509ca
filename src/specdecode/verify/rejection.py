"""Speculative sampling by modified rejection sampling, over a chain of drafts.

Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative Decoding" (2023),
and Chen et al., "Accelerating Large Language Model Decoding with Speculative Sampling" (2023).

Draft token `x_i` was drawn from the drafter's distribution `q_i`; the target's distribution at the
same position is `p_i` (both shaped by the same temperature / top-k / top-p). Walking the chain:
- `x_i` is *accepted* with probability `min(1, p_i(x_i) / q_i(x_i))`;
- at the first rejection, a *recovered* token is drawn from the residual
  `norm(max(p_i - q_i, 0))` and the step ends;
- if every draft is accepted, a *bonus* token is drawn from `p_k`, the target after the last one.
A deterministic drafter (no `draft_probs`) is a point mass: `q_i = one_hot(x_i)`, so acceptance is
`p_i(x_i)` and the residual is `p_i` with `x_i` removed.

Guarantee: each emitted token has exactly the target's distribution given the tokens before it, so
the output has the distribution of sampling the target alone (up to floating-point rounding).
"""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.errors import SpecDecodeError
from specdecode.sampling import sample_from, shaped_probs
from specdecode.tree import DraftTree
from specdecode.verify.base import Verdict, Verifier


class RejectionVerifier(Verifier):
    name = "rejection"

    def verify(
        self,
        tree: DraftTree,
        target_logits: torch.Tensor,  # [N+1, V]
        sampling: SamplingParams,
        rng: torch.Generator | None,
    ) -> Verdict:
        if not tree.is_chain:
            raise SpecDecodeError("the 'rejection' verifier takes chains; use a tree verifier")
        num_drafts = tree.num_nodes
        target_probs = shaped_probs(target_logits, sampling)  # [k+1, V]
        draft_tokens = tree.tokens  # [k]
        rows = torch.arange(num_drafts)
        if tree.draft_probs is None:
            draft_probs = torch.zeros(num_drafts, target_probs.shape[-1])
            draft_probs[rows, draft_tokens] = 1.0
        else:
            draft_probs = tree.draft_probs.float()  # [k, V]

        p_of_draft = target_probs[rows, draft_tokens]  # [k]
        q_of_draft = draft_probs[rows, draft_tokens]  # [k]
        # u < p/q  <=>  u * q < p; written without a division so q == 0 (a token the drafter could
        # not have drawn) is never accepted.
        uniforms = torch.rand(num_drafts, generator=rng)
        accepted = uniforms * q_of_draft < p_of_draft  # [k]
        num_accepted = int(torch.cumprod(accepted.int(), dim=0).sum()) if num_drafts else 0

        if num_accepted == num_drafts:
            next_token = int(sample_from(target_probs[num_drafts], rng))
            bonus = True
        else:
            residual = (target_probs[num_accepted] - draft_probs[num_accepted]).clamp_min(0.0)
            mass = residual.sum()
            # A rejection implies p(x) < q(x), hence mass > 0 in exact arithmetic; rounding can
            # still leave nothing, and then p itself is the right distribution to fall back on.
            residual = residual / mass if mass > 0 else target_probs[num_accepted]
            next_token = int(sample_from(residual, rng))
            bonus = False
        path = list(range(num_accepted))
        tokens = draft_tokens[:num_accepted].tolist() + [next_token]
        return Verdict(path, tokens, num_drafts, bonus)
