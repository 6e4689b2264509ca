"""Multi-round speculative sampling over a token tree (SpecInfer).

Miao et al., "SpecInfer: Accelerating Large Language Model Serving with Tree-based Speculative
Inference and Verification" (2024), its multi-step speculative sampling.

From the root down: at a node whose target distribution is `p`, its children `x_1..x_k` are tried
in order. Child `x_i`, drawn from `q_i` (its row of `draft_probs`; a point mass on `x_i` for
deterministic drafts), is *accepted* with probability `min(1, p(x_i) / q_i(x_i))` and the walk
descends into it; on rejection `p` becomes the residual `norm(max(p - q_i, 0))` and the next
sibling is tried. When every child is rejected a *recovered* token is drawn from the last residual;
at a node without children the *bonus* token is drawn from `p`.

Guarantee: lossless. Each emitted token has the target's distribution given the tokens before it,
when the children are independent draws from their `q_i` (with replacement: siblings may repeat)
or deterministic choices; for draws without replacement use `rrs-without-replacement`.
"""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.sampling import sample_from, shaped_probs
from specdecode.tree import DraftTree
from specdecode.verify.base import Verdict, Verifier


class SpecInferVerifier(Verifier):
    name = "specinfer"
    supports_trees = True

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
            proposal: torch.Tensor | None = None  # what the last sibling was drawn from
            accepted = None
            for child in children:
                token = draft_tokens[child]
                proposal = self.proposal_for(tree, child, proposal, probs.shape[-1])  # [V]
                if float(torch.rand((), generator=rng)) * float(proposal[token]) < float(
                    probs[token]
                ):
                    accepted = child
                    break
                probs = residual(probs, proposal)
                proposal = self.after_rejection(proposal, token)
            if accepted is None:
                token = int(sample_from(probs, rng))
                tokens = [draft_tokens[n] for n in path] + [token]
                return Verdict(path, tokens, tree.num_nodes, bonus=not children)
            path.append(accepted)
            slot = accepted + 1

    def proposal_for(
        self, tree: DraftTree, child: int, previous: torch.Tensor | None, vocab_size: int
    ) -> torch.Tensor:  # [V]
        """The distribution `child` was drawn from: its own row (independent draws)."""
        return draft_row(tree, child, vocab_size)

    def after_rejection(self, proposal: torch.Tensor, token: int) -> torch.Tensor | None:
        """What the next sibling's proposal depends on (nothing, for independent draws)."""
        return None


def draft_row(tree: DraftTree, node: int, vocab_size: int) -> torch.Tensor:  # [V]
    """The distribution node `node` was drawn from; a point mass for deterministic drafts."""
    if tree.draft_probs is not None:
        return tree.draft_probs[node].float()
    point_mass = torch.zeros(vocab_size)
    point_mass[int(tree.tokens[node])] = 1.0
    return point_mass


def residual(probs: torch.Tensor, proposal: torch.Tensor) -> torch.Tensor:  # [V]
    """norm(max(p - q, 0)): what is left of the target after a proposal from q was rejected."""
    leftover = (probs - proposal).clamp_(min=0.0)
    total = float(leftover.sum())
    # A zero residual means p <= q everywhere, i.e. p == q: rejection was (numerically) impossible.
    return leftover / total if total > 0 else probs
