"""REST: draft what followed the current suffix in a corpus, as a trie of its continuations.

He et al., "REST: Retrieval-Based Speculative Decoding" (NAACL 2024). Model-free, like prompt
lookup, but it copies from a datastore (`specdecode datastore build`) rather than the request: a
corpus of code, documentation or earlier conversations, tokenized once and searched through its
suffix array. Each step the longest suffix of the text (at most `max_match` tokens, at least
`min_match`) that occurs in the corpus is found, up to `max_occurrences` of its occurrences are
read, and their continuations form a trie whose node counts estimate how likely each draft is.
A chain follows the most frequent child; a tree (`--tree`, any shape: its width and node budget
are used) grows best first by the share of the occurrences that reach each node, as the paper's
draft selection by frequency. A node's share of its parent's occurrences is its `confidence`.
Drafts are deterministic (point-mass proposals).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import torch

from specdecode.datastore import Datastore
from specdecode.drafters.base import Drafter, DrafterResources
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget, DraftTree


class RestDrafter(Drafter):
    name = "rest"
    supports_trees = True

    def __init__(
        self,
        datastore: Datastore,
        max_match: int = 16,
        min_match: int = 2,
        max_occurrences: int = 256,
        tree: bool = False,
    ) -> None:
        if not 1 <= min_match <= max_match:
            raise SpecDecodeError(
                f"rest needs 1 <= min_match <= max_match, got {min_match}, {max_match}"
            )
        if max_occurrences < 1:
            raise SpecDecodeError(f"rest needs max_occurrences >= 1, got {max_occurrences}")
        self.datastore = datastore
        self.max_match = max_match
        self.min_match = min_match
        self.max_occurrences = max_occurrences
        self.tree = tree

    @classmethod
    def create(cls, options: dict[str, Any], resources: DrafterResources) -> RestDrafter:
        options = dict(options)
        path = options.pop("datastore", None)
        if path is None:
            raise SpecDecodeError(
                "rest drafts from a datastore: give --datastore FILE (make one with "
                "`specdecode datastore build FILES... --out FILE`)"
            )
        datastore = Datastore.shared(resources.shared, path, resources.vocabulary)
        return cls(datastore, **options, tree=resources.tree is not None)

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        most = min(budget.max_nodes or 0, budget.max_depth * budget.max_width)
        if budget.max_depth == 0 or most == 0:
            return DraftTree.empty()
        matched, lo, hi = self.datastore.longest_match(context, self.max_match)
        if matched < self.min_match:
            return DraftTree.empty()
        copies = self.datastore.continuations(
            lo, hi, matched, budget.max_depth, self.max_occurrences
        )
        return frequent_trie(copies, most, budget.max_width if self.tree else 1)


def frequent_trie(copies: list[list[int]], most: int, width: int) -> DraftTree:
    """The `most` nodes of the copies' trie reached by the largest share of them, best first
    (each node after its parent), at most `width` children per node."""
    total = len(copies)
    tokens: list[int] = []
    parents: list[int] = []
    confidence: list[float] = []  # each node's share of its parent's copies
    reach: list[float] = []  # each node's share of all copies
    # (-share of all copies, order, token, parent node, depth, the copies through the node)
    frontier: list[tuple[float, int, int, int, int, list[list[int]]]] = []
    order = 0

    def push_children(node: int, depth: int, through: list[list[int]]) -> None:
        nonlocal order
        groups: dict[int, list[list[int]]] = {}
        for copy in through:
            if len(copy) > depth:
                groups.setdefault(copy[depth], []).append(copy)
        for token, group in sorted(groups.items(), key=lambda item: -len(item[1]))[:width]:
            order += 1
            heapq.heappush(frontier, (-len(group) / total, order, token, node, depth, group))

    push_children(-1, 0, copies)
    while frontier and len(tokens) < most:
        negative, _, token, parent, depth, group = heapq.heappop(frontier)
        tokens.append(token)
        parents.append(parent)
        confidence.append(-negative / (1.0 if parent < 0 else reach[parent]))
        reach.append(-negative)
        push_children(len(tokens) - 1, depth + 1, group)
    return DraftTree(
        torch.tensor(tokens, dtype=torch.long),
        torch.tensor(parents, dtype=torch.long),
        confidence=torch.tensor(confidence, dtype=torch.float32),
    )
