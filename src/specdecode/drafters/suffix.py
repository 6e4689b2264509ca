"""SuffixDecoding: draft what most often followed the current suffix, in this request and before.

Oliaro et al., "SuffixDecoding: Extreme Speculative Decoding for Emerging AI Applications"
(NeurIPS 2025; Arctic Inference, and vLLM's `suffix` method). Model-free, like prompt lookup,
but it remembers: besides an index of the current request's prompt and output, one index of
every finished request's output (and, with `cache_prompts`, prompt) lives as long as the engine
(the server, a bench run), up to `max_cached_tokens` tokens, the oldest requests evicted first.
An agent that repeats its own structure across calls (tool calls, JSON, a fix-and-retest loop)
finds its next tokens there.

Each step, in each index, the longest suffix of the context (up to `max_depth` tokens) that
occurred before is found, and the draft follows what came after its occurrences: a token's
estimated probability is the share of its parent's occurrences that it continued (so the
siblings' shares sum to at most 1), multiplied down the path. A chain takes the most frequent
token at each depth; a tree (`--tree`, any shape: its width and node budget are used) grows best
first by path probability, as the paper's speculation tree. Nodes below `min_token_prob` are not
drafted, and a match of m tokens drafts at most `max_spec_factor * m + max_spec_offset` (a short
match is a weak guess). Of the two indexes' drafts the one with the higher score, the expected
number of accepted tokens (the sum of the path probabilities), is proposed.

Each node's `confidence` is its share of its parent's occurrences: the forecast chance that it is
accepted once its parent is, which a cost-aware controller uses to cut the draft. Drafts are
deterministic (point-mass proposals). `cache_file` loads the cross-request index from a file
made with the same tokenizer and saves it after each request.
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdecode.config import SamplingParams
from specdecode.drafters.base import NO_TARGET_OUTPUT, Drafter, DrafterResources, TargetOutput
from specdecode.drafters.suffix_index import SuffixIndex
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget, DraftTree


@dataclass
class _Draft:
    tokens: list[int]
    parents: list[int]
    shares: list[float]  # each node's share of its parent's occurrences
    score: float  # expected accepted tokens: the sum of the path probabilities


_NO_DRAFT = _Draft([], [], [], 0.0)


class SuffixDrafter(Drafter):
    name = "suffix"
    supports_trees = True

    def __init__(
        self,
        max_depth: int = 24,
        max_spec_factor: float = 1.0,
        max_spec_offset: float = 0.0,
        min_token_prob: float = 0.1,
        max_cached_tokens: int = 1_000_000,
        cache_prompts: bool = False,
        cache_file: str | None = None,
        shared: dict[str, Any] | None = None,
        vocabulary: str = "",
        tree: bool = False,
    ) -> None:
        if max_depth < 1:
            raise SpecDecodeError(f"suffix needs max_depth >= 1, got {max_depth}")
        if max_spec_factor < 0 or max_spec_offset < -max_depth:
            raise SpecDecodeError(
                f"suffix needs max_spec_factor >= 0 and max_spec_offset >= -max_depth, got "
                f"{max_spec_factor}, {max_spec_offset}"
            )
        if not 0 <= min_token_prob <= 1:
            raise SpecDecodeError(f"suffix needs 0 <= min_token_prob <= 1, got {min_token_prob}")
        if max_cached_tokens < 0:
            raise SpecDecodeError(
                f"suffix needs max_cached_tokens >= 0 (0: no cross-request cache), got "
                f"{max_cached_tokens}"
            )
        if cache_file is not None and not vocabulary:
            raise SpecDecodeError("a suffix cache_file needs the model's tokenizer to check it")
        self.max_depth = max_depth
        self.max_spec_factor = max_spec_factor
        self.max_spec_offset = max_spec_offset
        self.min_token_prob = min_token_prob
        self.cache_prompts = cache_prompts
        self.cache_file = Path(cache_file).expanduser() if cache_file else None
        self.vocabulary = vocabulary
        self.tree = tree
        self.cache = _shared_cache(shared if shared is not None else {}, max_cached_tokens, self)
        self.reset()

    @classmethod
    def create(cls, options: dict[str, Any], resources: DrafterResources) -> SuffixDrafter:
        return cls(
            **options,
            shared=resources.shared,
            vocabulary=resources.vocabulary,
            tree=resources.tree is not None,
        )

    def reset(self) -> None:
        self.local = SuffixIndex()  # the current request's prompt and output
        self.prompt: list[int] = []
        self.seen = 0  # tokens of the context in `local`

    def begin(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        rng: torch.Generator | None,
        target: TargetOutput = NO_TARGET_OUTPUT,
    ) -> None:
        self.reset()
        self.prompt = [int(t) for t in prompt]

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        self.local.extend(context[self.seen :])
        self.seen = len(context)
        if budget.max_depth == 0:
            return DraftTree.empty()
        drafts = [self._draft(self.local, context, budget)]
        if self.cache is not None:
            drafts.append(self._draft(self.cache, context, budget))
        best = max(drafts, key=lambda draft: draft.score)
        if not best.tokens:
            return DraftTree.empty()
        return DraftTree(
            torch.tensor(best.tokens, dtype=torch.long),
            torch.tensor(best.parents, dtype=torch.long),
            confidence=torch.tensor(best.shares, dtype=torch.float32),
        )

    def end(self, context: Sequence[int]) -> None:
        if self.cache is None:
            return
        output = [int(t) for t in context[len(self.prompt) :]]
        self.cache.add_sequence((self.prompt if self.cache_prompts else []) + output)
        if self.cache_file is not None:
            try:
                self.cache.save(self.cache_file, self.vocabulary)
            except OSError as exc:  # the answer stands; only the file falls behind
                warnings.warn(
                    f"specdecode: could not save the suffix cache {self.cache_file}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def _draft(self, index: SuffixIndex, context: Sequence[int], budget: Budget) -> _Draft:
        matched, ends = index.longest_match(context, self.max_depth)
        if matched == 0:
            return _NO_DRAFT
        most = math.floor(matched * self.max_spec_factor + self.max_spec_offset)
        most = min(most, budget.max_nodes or 0)
        deepest = min(budget.max_depth, self.max_depth)
        if most <= 0:
            return _NO_DRAFT
        width = budget.max_width if self.tree else 1
        draft = _Draft([], [], [], 0.0)
        # Best first by path probability: (-probability, order, parent node, share, token, ends).
        frontier: list[tuple[float, int, int, float, int, np.ndarray]] = []
        pushed = 0

        def push_children(node: int, probability: float, node_ends: np.ndarray) -> None:
            nonlocal pushed
            total = node_ends.size
            for token, child_ends in index.children(node_ends)[:width]:
                share = child_ends.size / total
                if probability * share < self.min_token_prob:
                    break  # most frequent first: the rest are rarer
                pushed += 1
                item = (-probability * share, pushed, node, share, token, child_ends)
                heapq.heappush(frontier, item)

        depths: list[int] = []
        push_children(-1, 1.0, ends)
        while frontier and len(draft.tokens) < most:
            negative, _, parent, share, token, child_ends = heapq.heappop(frontier)
            depth = 1 if parent < 0 else depths[parent] + 1
            if depth > deepest:
                continue
            node = len(draft.tokens)
            draft.tokens.append(token)
            draft.parents.append(parent)
            draft.shares.append(share)
            depths.append(depth)
            draft.score -= negative
            push_children(node, -negative, child_ends)
        return draft


def _shared_cache(
    shared: dict[str, Any], max_cached_tokens: int, drafter: SuffixDrafter
) -> SuffixIndex | None:
    """The engine's cross-request index for these options (made, or loaded, on first use)."""
    if max_cached_tokens == 0:
        return None
    key = f"suffix:{max_cached_tokens}:{drafter.cache_prompts}:{drafter.cache_file}"
    cache = shared.get(key)
    if cache is None:
        path = drafter.cache_file
        if path is not None and path.exists():
            cache = SuffixIndex.load(path, drafter.vocabulary, max_cached_tokens)
        else:
            if path is not None and not path.parent.is_dir():
                raise SpecDecodeError(
                    f"cannot write the suffix cache {path}: {path.parent} is not a directory"
                )
            cache = SuffixIndex(max_cached_tokens)
        shared[key] = cache
    return cache
