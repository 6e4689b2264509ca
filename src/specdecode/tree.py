"""The drafter -> verifier contract: a tree of draft tokens, and the budget a drafter may spend.

A `DraftTree` hangs below the *root*, the last committed token (whose logits the target has not yet
produced). Node `i` holds `tokens[i]` and its parent `parents[i]`, where -1 is the root. Nodes are
in topological order (`parents[i] < i`), which rules out cycles by construction.

A chain (classic speculative decoding) is the tree `parents = [-1, 0, 1, ...]`; plain
autoregressive decoding is the empty tree. One engine loop serves all of them.

`draft_probs[i]` is the distribution node `i` was drawn from, after the same temperature / top-k /
top-p shaping as the target's. Deterministic drafters (prompt lookup) leave it `None`: their
proposal is a point mass on the drafted token.

`confidence[i]`, when a drafter gives it, is the drafter's estimate of the chance that node `i` is
accepted once its parent is. It is a forecast for sizing the draft (a controller may cut a chain
to a prefix where it stops paying), never an input to verification: a wrong forecast costs speed
only. A cut must not depend on this step's random draws, so controllers leave sampled drafts (with
`draft_probs`) whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

import torch

from specdecode.errors import SpecDecodeError


class SiblingDraws(Enum):
    """How a drafter picked the children of a node at temperature > 0; which verifiers keep the
    target's distribution depends on it."""

    # chosen, not drawn: point-mass proposals, no draft_probs
    DETERMINISTIC = "chosen deterministically"
    # i.i.d. draws from the parent's draft distribution (tokens may repeat)
    INDEPENDENT = "drawn i.i.d."
    # distinct draws, each from what is left of the parent's draft distribution
    WITHOUT_REPLACEMENT = "drawn without replacement"


@dataclass(frozen=True)
class Budget:
    """How much a drafter may propose this step: tree depth, branching, and total node count."""

    max_depth: int
    max_width: int = 1
    max_nodes: int | None = None

    def __post_init__(self) -> None:
        if self.max_depth < 0 or self.max_width < 1:
            raise SpecDecodeError(
                f"invalid draft budget: depth {self.max_depth}, width {self.max_width}"
            )
        if self.max_nodes is None:
            object.__setattr__(self, "max_nodes", self.max_depth * self.max_width)

    @classmethod
    def chain(cls, length: int) -> Budget:
        return cls(max_depth=length, max_width=1, max_nodes=length)


@dataclass(frozen=True, eq=False)
class DraftTree:
    tokens: torch.Tensor  # [N] int64
    parents: torch.Tensor  # [N] int64, -1 = the root (last committed token)
    draft_probs: torch.Tensor | None = None  # [N, V] float32, or None for point-mass drafts
    confidence: torch.Tensor | None = None  # [N] float32 in [0, 1], or None: no forecast

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        if self.tokens.dim() != 1 or self.parents.shape != (n,):
            raise SpecDecodeError(
                "malformed draft tree: tokens and parents must both have shape [N]"
            )
        if n and not bool(((self.parents >= -1) & (self.parents < torch.arange(n))).all()):
            raise SpecDecodeError(
                "malformed draft tree: every parent must come before its child (parents[i] < i)"
            )
        if self.draft_probs is not None and self.draft_probs.shape[0] != n:
            raise SpecDecodeError("malformed draft tree: draft_probs must have one row per node")
        if self.confidence is not None and self.confidence.shape != (n,):
            raise SpecDecodeError("malformed draft tree: confidence must have shape [N]")

    @classmethod
    def empty(cls) -> DraftTree:
        return cls(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))

    @classmethod
    def chain(
        cls,
        tokens: list[int] | torch.Tensor,
        draft_probs: torch.Tensor | None = None,
        confidence: torch.Tensor | None = None,
    ) -> DraftTree:
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        parents = torch.arange(tokens.shape[0], dtype=torch.long) - 1
        return cls(tokens, parents, draft_probs, confidence)

    @classmethod
    def trie(cls, chains: Iterable[Sequence[int]], max_width: int, max_nodes: int) -> DraftTree:
        """Chains below the root merged, in order: chains that agree share their nodes, and where
        they part each becomes a branch while its node has fewer than `max_width` children and
        the tree fewer than `max_nodes` nodes (a chain that finds no room stops there)."""
        tokens: list[int] = []
        parents: list[int] = []
        children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        fanout: dict[int, int] = {}  # parent node -> children so far
        for chain in chains:
            if len(tokens) >= max_nodes:
                break
            node = -1
            for token in chain:
                child = children.get((node, int(token)))
                if child is None:
                    if len(tokens) >= max_nodes or fanout.get(node, 0) >= max_width:
                        break
                    child = len(tokens)
                    tokens.append(int(token))
                    parents.append(node)
                    children[(node, int(token))] = child
                    fanout[node] = fanout.get(node, 0) + 1
                node = child
        return cls(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))

    def prefix(self, length: int) -> DraftTree:
        """The first `length` nodes of a chain (its drafts up to depth `length`)."""
        if not self.is_chain:
            raise SpecDecodeError("only a chain can be cut to a prefix")
        if length >= self.num_nodes:
            return self
        length = max(0, length)
        return DraftTree(
            self.tokens[:length],
            self.parents[:length],
            None if self.draft_probs is None else self.draft_probs[:length],
            None if self.confidence is None else self.confidence[:length],
        )

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.shape[0])

    def __len__(self) -> int:
        return self.num_nodes

    @cached_property
    def is_chain(self) -> bool:
        return bool((self.parents == torch.arange(self.num_nodes) - 1).all())

    @cached_property
    def depths(self) -> torch.Tensor:  # [N], children of the root have depth 1
        depths = torch.zeros(self.num_nodes, dtype=torch.long)
        parents = self.parents.tolist()
        for i, parent in enumerate(parents):  # N is a few dozen at most: built once per step
            depths[i] = 1 if parent < 0 else depths[parent] + 1
        return depths

    @cached_property
    def ancestor_mask(self) -> torch.Tensor:  # [N, N] bool, [i, j] = j is i or an ancestor of i
        n = self.num_nodes
        mask = torch.eye(n, dtype=torch.bool)
        parents = self.parents.tolist()
        for i, parent in enumerate(parents):
            if parent >= 0:
                mask[i] |= mask[parent]
        return mask

    @cached_property
    def attention_mask(self) -> torch.Tensor:  # [N+1, N+1] bool over (root, nodes...)
        """Who may attend to whom in one forward over the root followed by the nodes."""
        n = self.num_nodes
        mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        mask[:, 0] = True
        mask[1:, 1:] = self.ancestor_mask
        return mask

    @cached_property
    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in range(self.num_nodes + 1)]  # slot 0 is the root
        for i, parent in enumerate(self.parents.tolist()):
            kids[parent + 1].append(i)
        return kids

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node` (inclusive)."""
        path = []
        parents = self.parents.tolist()
        while node >= 0:
            path.append(node)
            node = parents[node]
        return path[::-1]
