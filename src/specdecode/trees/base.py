"""The tree-shape contract: how a drafter with a next-token distribution grows a `DraftTree`.

A shape decides which children each node gets (the top of the draft distribution, i.i.d. draws,
draws without replacement, ...) and which nodes are kept under the budget. It never touches a
model: it asks an `Expander` for the draft distribution after nodes it has added, and the expander
(a draft model's tree forward, a Markov table in the tests) computes it.

At temperature 0 every shape is deterministic (ranked by the draft's softmax), and the greedy
verifier takes any tree. At temperature > 0 a shape either draws its nodes at random (`sampled`:
the tree carries `draft_probs`, the distribution each node was drawn from) or picks them
deterministically (point-mass proposals, no `draft_probs`); `sampling_verifier` names the lossless
verifier that matches how the nodes were drawn.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

import torch

from specdecode.config import SamplingParams
from specdecode.errors import SpecDecodeError
from specdecode.sampling import shaped_probs
from specdecode.tree import Budget, DraftTree, SiblingDraws


class Expander(Protocol):
    def expand(self, nodes: list[int], parents: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed `nodes` (ids into `parents` / `tokens`, whose ancestors were fed before) and
        return the draft logits after each. [len(nodes), V]"""
        ...


class FedNodes:
    """The tree nodes a drafter has fed to its model, in order, after the context: each new level
    sees the context and its ancestors among them (what an `Expander` of a model builds)."""

    def __init__(self, root_position: int) -> None:
        self.root_position = root_position  # a node at depth d sits at root_position + d
        self.slot: dict[int, int] = {}  # tree node -> its index among the nodes fed

    def add(
        self, nodes: list[int], parents: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [n, fed] bool, [n] positions
        """Feed `nodes`: which fed slots each may see (its ancestors and itself), and their
        positions."""
        for node in nodes:
            self.slot[node] = len(self.slot)
        visible = torch.zeros(len(nodes), len(self.slot), dtype=torch.bool)
        positions = []
        for row, node in enumerate(nodes):
            depth, ancestor = 0, node
            while ancestor >= 0:
                visible[row, self.slot[ancestor]] = True
                ancestor, depth = parents[ancestor], depth + 1
            positions.append(self.root_position + depth)
        return visible, torch.tensor(positions, dtype=torch.long)


def ranking_probs(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """The distribution a shape draws from or ranks by: the sampler's, or at temperature 0 the
    plain softmax (a one-hot would rank nothing below the argmax). [..., V]"""
    if sampling.greedy:
        return torch.softmax(logits.float(), dim=-1)
    return shaped_probs(logits, sampling)


class PartialTree:
    """A tree being grown: nodes in the order added (parents first), their draft distributions
    once fed, and each node's cumulative draft log-probability."""

    def __init__(
        self, root_logits: torch.Tensor, expander: Expander, sampling: SamplingParams
    ) -> None:
        self.expander = expander
        self.sampling = sampling
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.scores: list[float] = []  # log q of the path down to each node
        self.dist: dict[int, torch.Tensor] = {-1: ranking_probs(root_logits, sampling)}

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int) -> int:
        prob = float(self.dist[parent][token])
        base = 0.0 if parent < 0 else self.scores[parent]
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.scores.append(base + (math.log(prob) if prob > 0 else float("-inf")))
        return len(self.tokens) - 1

    def feed(self, nodes: list[int]) -> None:
        """Compute the draft distribution after each of `nodes` (one expander call)."""
        if not nodes:
            return
        logits = self.expander.expand(nodes, self.parents, self.tokens)  # [n, V]
        probs = ranking_probs(logits, self.sampling)
        for row, node in enumerate(nodes):
            self.dist[node] = probs[row]

    def finish(self, keep: list[int] | None = None, with_probs: bool = False) -> DraftTree:
        """The tree of the nodes in `keep` (default all; closed under ancestors), renumbered in
        the order added, with each node's draft distribution when `with_probs`."""
        kept = sorted(range(len(self.tokens)) if keep is None else keep)
        index = {node: i for i, node in enumerate(kept)}
        index[-1] = -1
        if any(self.parents[node] not in index for node in kept):
            raise RuntimeError("kept tree nodes must include every ancestor")
        tokens = torch.tensor([self.tokens[n] for n in kept], dtype=torch.long)
        parents = torch.tensor([index[self.parents[n]] for n in kept], dtype=torch.long)
        probs = None
        if with_probs and kept:
            # Each node was drawn from its parent's distribution.
            probs = torch.stack([self.dist[self.parents[n]] for n in kept])  # [N, V]
        return DraftTree(tokens, parents, probs)


class TreeShape(ABC):
    """How to grow a draft tree within a budget; one subclass per file."""

    name: ClassVar[str]
    #: How siblings are picked at temperature > 0 (anything but DETERMINISTIC carries
    #: `draft_probs`).
    siblings: ClassVar[SiblingDraws] = SiblingDraws.DETERMINISTIC
    #: The lossless verifier for this shape at temperature > 0.
    sampling_verifier: ClassVar[str] = "specinfer"

    @property
    def sampled(self) -> bool:
        """Whether, at temperature > 0, nodes are random draws that carry `draft_probs`."""
        return self.siblings is not SiblingDraws.DETERMINISTIC

    def __init__(self, **options: Any) -> None:
        if options:
            raise SpecDecodeError(f"the {self.name!r} tree takes no options, got {sorted(options)}")

    @abstractmethod
    def grow(
        self,
        root_logits: torch.Tensor,  # [V] draft logits after the root
        expander: Expander,
        budget: Budget,
        sampling: SamplingParams,
        rng: torch.Generator | None,
    ) -> DraftTree:
        """A tree of at most `budget.max_nodes` nodes and depth `budget.max_depth`."""


def top_children(probs: torch.Tensor, count: int) -> list[int]:
    """The `count` most likely tokens with nonzero probability, most likely first."""
    count = min(count, int((probs > 0).sum()))
    return torch.topk(probs, count).indices.tolist() if count > 0 else []


def draw_without_replacement(
    probs: torch.Tensor, count: int, rng: torch.Generator | None
) -> list[int]:
    """`count` distinct tokens, drawn one after another from `probs` renormalised over the tokens
    not drawn yet (Gumbel-top-k: the top of log p + Gumbel noise, in order, has that law)."""
    count = min(count, int((probs > 0).sum()))
    if count <= 0:
        return []
    uniforms = torch.rand(probs.shape, generator=rng).clamp_(min=1e-20)
    keys = probs.log() - torch.log(-torch.log(uniforms))
    return torch.topk(keys, count).indices.tolist()
