"""Typical acceptance (Medusa). LOSSY: opt-in only, never a default.

Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads"
(2024), section on typical acceptance.

A drafted token `x` at a node whose target distribution is `p` (after temperature / top-k / top-p)
is *accepted* when `p(x) > min(epsilon, delta * exp(-H(p)))`, where `H(p)` is the entropy of `p`:
a token the target finds plausible enough is kept even if the target would rarely have sampled it
there. The verifier keeps the deepest path of the tree whose every token passes, the first such
path in node order when several are as deep, and then draws the next token from `p` after its last
node (a *bonus* token at a leaf, a *recovered* one elsewhere). No random number decides acceptance.

Guarantee: none on the distribution. The output is NOT what the target alone would sample: it
over-represents tokens the drafter likes and cuts the target's tail (lower diversity, the trade
the paper makes for speed). At temperature 0 `p` is one-hot and only the argmax passes, so greedy
output is unchanged. `specdecode certify` reports it as lossy.
"""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams
from specdecode.sampling import sample_from, shaped_probs
from specdecode.tree import DraftTree, SiblingDraws
from specdecode.verify.base import Verdict, Verifier


class TypicalAcceptanceVerifier(Verifier):
    name = "lossy-typical"
    supports_trees = True
    lossless = False
    lossless_for = frozenset(SiblingDraws)  # says nothing: it is lossy for every draft

    def __init__(self, epsilon: float = 0.09, delta: float = 0.3) -> None:
        # Medusa's defaults: a hard floor of 0.09, scaled down to 0.3 e^-H for flat distributions.
        self.epsilon = epsilon
        self.delta = delta

    def verify(
        self,
        tree: DraftTree,
        target_logits: torch.Tensor,  # [N+1, V]
        sampling: SamplingParams,
        rng: torch.Generator | None,
    ) -> Verdict:
        target_probs = shaped_probs(target_logits, sampling)  # [N+1, V]
        entropy = -(target_probs * target_probs.clamp_min(1e-30).log()).sum(-1)  # [N+1]
        threshold = torch.clamp(self.delta * torch.exp(-entropy), max=self.epsilon)  # [N+1]
        parents = tree.parents.tolist()
        tokens = tree.tokens.tolist()
        passes: list[bool] = []  # node i and all its ancestors pass
        for node, parent in enumerate(parents):
            slot = parent + 1  # the row of the distribution node `node` is judged against
            own = float(target_probs[slot, tokens[node]]) > float(threshold[slot])
            passes.append(own and (parent < 0 or passes[parent]))
        best, best_depth = -1, 0
        depths = tree.depths.tolist()
        for node, ok in enumerate(passes):
            if ok and depths[node] > best_depth:
                best, best_depth = node, depths[node]
        path = tree.path_to(best) if best >= 0 else []
        next_token = int(sample_from(target_probs[best + 1], rng))
        at_leaf = not tree.children[best + 1]
        return Verdict(path, [tokens[n] for n in path] + [next_token], tree.num_nodes, at_leaf)
