"""Lookahead decoding: Jacobi iterations on a window of future positions, inside verification.

Fu et al., "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding" (ICML 2024).
No draft model and no corpus: the target itself guesses ahead. A window of `window` future
positions holds `ngram - 1` levels of guesses, one level per past Jacobi iteration. Each step the
target's forward, which verifies the draft anyway, also runs one more iteration of the window:
the latest level's next-token predictions become a new level (the oldest is dropped), and each
diagonal of the window (a guess at position i, the next level's at i + 1, ...) plus the new
prediction is an n-gram the target generated, kept in a pool under its first token. The draft is
up to `guesses` of the pool's n-grams that start with the last committed token.

The window rides in the verification forward as part of the draft tree, so every backend that
verifies trees runs it, with no attention mask of its own: a guess at level l and position i
depends on the committed text, the oldest level up to position i - l, and the diagonal above it,
which is exactly a tree path (the oldest level is a chain below the root; level l's guess at
position i is the child of level l - 1's at i - 1), and the path's depth is the position. Its
nodes are drafts like any others: verification accepts those that happen to be right, and
losslessness holds as for every tree. A window of W positions and n-grams of N tokens costs
(N - 1) x W rows and the guesses up to G x (N - 1) more: where the target's forward grows with its
rows (a CPU), this pays only if the guesses are accepted often (docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from specdecode.config import SamplingParams
from specdecode.drafters.base import NO_TARGET_OUTPUT, Drafter, DrafterResources, TargetOutput
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget, DraftTree
from specdecode.verify.base import Verdict


class LookaheadDrafter(Drafter):
    name = "lookahead"
    supports_trees = True

    def __init__(
        self, window: int = 4, ngram: int = 3, guesses: int = 4, max_context: int | None = None
    ) -> None:
        if window < 1 or ngram < 2 or guesses < 0:
            raise SpecDecodeError(
                f"lookahead needs window >= 1, ngram >= 2 and guesses >= 0, got {window}, "
                f"{ngram}, {guesses}"
            )
        if max_context is not None and window + ngram >= max_context:
            raise SpecDecodeError(
                f"a lookahead window of {window} positions and {ngram}-grams reaches past the "
                f"model's context ({max_context} tokens): use a smaller --window or --ngram"
            )
        self.window = window
        self.ngram = ngram
        self.guesses = guesses
        self.reset()

    @classmethod
    def create(cls, options: dict[str, Any], resources: DrafterResources) -> LookaheadDrafter:
        if resources.tree is None:
            raise SpecDecodeError(
                "lookahead verifies its window and its guesses as one tree: add --tree static "
                "(--tree-nodes caps the rows it adds to each forward)"
            )
        return cls(**options, max_context=resources.target.max_context)

    def reset(self) -> None:
        self.levels: list[list[int]] = []  # oldest first, each `window` guesses
        self.pool: dict[int, list[tuple[int, ...]]] = {}  # first token -> n-grams' rest
        self.last_level: list[int] = []  # the latest level's nodes in the last proposal
        self.diagonals: list[list[int]] = []  # per last-level node, its diagonal's tokens

    def begin(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        rng: torch.Generator | None,
        target: TargetOutput = NO_TARGET_OUTPUT,
    ) -> None:
        self.reset()
        # The first level is guessed from the prompt's own tokens, as the paper does.
        self.levels = [[int(prompt[i % len(prompt)]) for i in range(-self.window, 0)]]

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        most = budget.max_nodes if budget.max_nodes is not None else budget.max_depth
        self.last_level, self.diagonals = [], []
        levels = max(1, len(self.levels))
        # The window is what learns, so its nodes are set aside first: as wide as the depth and
        # the node budget allow; the guesses take what is left.
        width = min(self.window, budget.max_depth - levels + 1, most // levels)
        room = most - levels * max(width, 0)
        # The guesses: the n-grams that start with the last committed token, as a trie.
        guesses = [
            guess[: budget.max_depth]
            for guess in self.pool.get(int(context[-1]), [])[: self.guesses]
        ]
        trie = DraftTree.trie(guesses, max_width=max(1, len(guesses)), max_nodes=max(room, 0))
        tokens, parents = trie.tokens.tolist(), trie.parents.tolist()
        # Then the window.
        if width >= 1 and self.levels:
            at: dict[tuple[int, int], int] = {}  # (level, position) -> node
            for level, guessed in enumerate(self.levels):
                for position in range(level, level + width):
                    if level == 0:
                        parent = -1 if position == 0 else at[(0, position - 1)]
                    else:
                        parent = at[(level - 1, position - 1)]
                    at[(level, position)] = len(tokens)
                    tokens.append(guessed[position - level])
                    parents.append(parent)
            last = levels - 1
            for position in range(last, last + width):
                self.last_level.append(at[(last, position)])
                diagonal = [tokens[at[(level, position - last + level)]] for level in range(levels)]
                self.diagonals.append(diagonal)
        return DraftTree(
            torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)
        )

    def update(self, verdict: Verdict, target: TargetOutput = NO_TARGET_OUTPUT) -> None:
        if target.logits is None or not self.last_level:
            return
        rows = [node + 1 for node in self.last_level]  # row 0 is the root
        if rows[-1] >= target.logits.shape[0]:  # a controller cut the window: nothing learned
            self.last_level = []
            return
        predicted = target.logits[rows].argmax(dim=-1).tolist()  # the next iteration's level
        if len(self.levels) == self.ngram - 1:
            for diagonal, token in zip(self.diagonals, predicted, strict=True):
                kept = self.pool.setdefault(diagonal[0], [])
                ngram = (*diagonal[1:], token)
                if ngram in kept:
                    kept.remove(ngram)
                kept.insert(0, ngram)  # the most recent first
                del kept[max(self.guesses, 1) * 4 :]
        # A narrower window than configured (a tight budget) keeps its old guesses beyond.
        newest = predicted + self.levels[-1][len(predicted) :]
        self.levels = [*self.levels, newest][-(self.ngram - 1) :]
        self.last_level = []
