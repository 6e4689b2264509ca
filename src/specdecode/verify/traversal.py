"""Traversal Verification: judge whole paths, from the leaves up.

Weng et al., "Traversal Verification for Speculative Tree Decoding" (2025); on a chain it is the
block verification of Sun et al., "Block Verification Accelerates Speculative Decoding" (2024).

Token-level verifiers (`rejection`, `specinfer`, `rrs-without-replacement`) stop at the first
token the target dislikes, even when the tokens after it would more than make up for it. This
verifier weighs a whole path instead. Each node `v` (token `t`, parent `u`) carries a path value
`a(v) = min(1, a(u) p_u(t) / q_u(t))`, `a(root) = 1`, where `p_u` is the target's distribution at
`u` and `q_u` the draft distribution `u`'s children were drawn from. Then, repeatedly:

- visit the first node in post-order: from the root, step into the first live child (in the order
  the siblings were drawn) until a node has none;
- if that node is the root, every branch was rejected: the *recovered* token is drawn from
  `p_root` (by now a residual) and the step ends;
- otherwise *accept* the whole path down to it with probability `a(v)`; the step ends with the
  path and one more token drawn from `p_v` (the *bonus* token at a leaf of the drafted tree, a
  *recovered* one from `p_v`'s residual if `v`'s children were all rejected);
- on rejection, `v` and its subtree are dropped and its parent absorbs what was left:
  `r = max(a(u) p_u - q_u, 0)`, `p_u <- r / sum(r)`, `q_u <- q_u` without `t` (renormalised),
  `a(u) <- sum(r) / (sum(r) + 1 - a(u))`, and the values below `u` are recomputed from the new
  rows.

Guarantee: lossless when siblings are drawn without replacement from `q_u`, in the order they are
stored (the `without-replacement` and `delayed` trees), and on any chain, point-mass drafts
included (there, it is block verification). It accepts at least as many tokens per step as
token-level verification on the same draft, on average. At temperature 0 every ratio is 0 or 1
and it is the greedy walk (which it hands over to).
"""

from __future__ import annotations

import math

import torch

from specdecode.config import SamplingParams
from specdecode.sampling import sample_from, shaped_probs
from specdecode.tree import DraftTree, SiblingDraws
from specdecode.verify.base import Verdict, Verifier
from specdecode.verify.greedy import GreedyVerifier
from specdecode.verify.specinfer import draft_row


class TraversalVerifier(Verifier):
    name = "traversal"
    supports_trees = True
    lossless_for = frozenset({SiblingDraws.WITHOUT_REPLACEMENT})

    def verify(
        self,
        tree: DraftTree,
        target_logits: torch.Tensor,  # [N+1, V]
        sampling: SamplingParams,
        rng: torch.Generator | None,
    ) -> Verdict:
        if sampling.greedy:
            # One-hot targets: a path survives iff it is the argmax path, which is what the
            # greedy walk finds; the traversal's point-mass rows would only add 0 * inf.
            return GreedyVerifier().verify(tree, target_logits, sampling, rng)
        walk = _Traversal(tree, shaped_probs(target_logits, sampling))
        while True:
            slot = walk.first_in_post_order()
            if slot == 0:
                token = int(sample_from(walk.target[0], rng))
                return Verdict([], [token], tree.num_nodes, bonus=not tree.children[0])
            if float(torch.rand((), generator=rng)) < walk.value[slot]:
                path = tree.path_to(slot - 1)
                token = int(sample_from(walk.target[slot], rng))
                tokens = tree.tokens[path].tolist() + [token]
                return Verdict(path, tokens, tree.num_nodes, bonus=not tree.children[slot])
            walk.reject(slot)


class _Traversal:
    """The state of one traversal: live children, path values and the rows that residuals
    replace. Slots: 0 is the root, `i + 1` is node `i`."""

    def __init__(self, tree: DraftTree, target_probs: torch.Tensor) -> None:
        self.tree = tree
        self.target = target_probs  # [N+1, V], rows replaced by residuals as branches fall
        vocab_size = target_probs.shape[-1]
        self.tokens = tree.tokens.tolist()
        self.live = [list(kids) for kids in tree.children]  # [slot] -> live child node ids
        # The distribution each slot's children were drawn from (all siblings share it).
        self.draft = {
            slot: draft_row(tree, kids[0], vocab_size).clone()
            for slot, kids in enumerate(tree.children)
            if kids
        }
        self.value = [1.0] + [0.0] * tree.num_nodes  # a(slot)
        self.refresh_below(0)

    def first_in_post_order(self) -> int:
        slot = 0
        while self.live[slot]:
            slot = self.live[slot][0] + 1
        return slot

    def refresh_below(self, slot: int) -> None:
        """Recompute a() for the live descendants of `slot`, parents first."""
        pending = [slot]
        while pending:
            parent = pending.pop()
            for child in self.live[parent]:
                token = self.tokens[child]
                p = float(self.target[parent, token])
                q = float(self.draft[parent][token])
                if self.value[parent] == 0.0 or p == 0.0:
                    self.value[child + 1] = 0.0
                else:  # q == 0: a token the drafter could not have drawn; p > 0 accepts it
                    ratio = p / q if q > 0 else math.inf
                    self.value[child + 1] = min(1.0, self.value[parent] * ratio)
                pending.append(child + 1)

    def reject(self, slot: int) -> None:
        node = slot - 1
        parent = int(self.tree.parents[node]) + 1
        before = self.value[parent]
        leftover = (before * self.target[parent] - self.draft[parent]).clamp_(min=0.0)  # [V]
        mass = float(leftover.sum(dtype=torch.float64))
        if mass > 0:
            self.target[parent] = leftover / mass
        # else: no target mass is left above the draft; a(parent) becomes 0 below, so this row
        # is never sampled from (the root keeps a = 1 and its row: p == q there).
        draft = self.draft[parent].clone()
        draft[self.tokens[node]] = 0.0
        total = float(draft.sum())
        self.draft[parent] = draft / total if total > 0 else draft
        denominator = mass + 1.0 - before
        self.value[parent] = mass / denominator if denominator > 0 else 1.0
        self.live[parent].remove(node)
        self.refresh_below(parent)
