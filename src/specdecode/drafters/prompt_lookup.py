"""Prompt lookup decoding: draft what followed an earlier occurrence of the current suffix.

Saxena, "Prompt Lookup Decoding" (2023). Model-free: the longest suffix of the context (up to
`max_ngram` tokens, at least `min_ngram`) that occurred earlier in the prompt or the output so far
is found, and the tokens that followed its most recent occurrence are the draft. Output that
repeats its input (code editing, summarisation, RAG) is drafted nearly for free.

How long the draft is depends on how long the match is. A match of one or two tokens ("the", a
bracket) is a weak guess about what comes next, so it drafts at most `weak_draft` tokens; a match
of `strong_ngram` tokens or more usually means a passage is being copied, and drafts the whole
budget. Replaying recorded greedy outputs of the benchmark suites showed why: always drafting the
full budget wastes long verifications on weak matches, and always drafting short ones gives up the
long copies (llama.cpp's `ngram-simple` only drafts after a 12-token match, and then up to 48).

Each draft also carries a forecast (`DraftTree.confidence`): the chance that the copy goes on one
more token. A copy that has matched n tokens continues with a chance that grows with n, so draft
i (after a match of m tokens) is forecast at q(m + i - 1), the copy's match length once the drafts
before it are accepted. q is learned per sequence from the verdicts, by groups of match lengths,
starting from a prior measured on greedy outputs of the benchmark's prompts (`PRIOR_CONTINUES`,
worth `prior_weight` observations). A cost-aware controller cuts the draft where it stops paying.

With `--tree` (any shape: its width and node budget are used), the copies after every occurrence
of the match, most recent first, are merged into one tree: copies that agree share nodes, and
where they part each becomes a branch, so the target picks whichever continuation is right.
Drafts are deterministic, so they carry no `draft_probs` (a point-mass proposal).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from specdecode.config import SamplingParams
from specdecode.drafters.base import NO_TARGET_OUTPUT, Drafter, DrafterResources, TargetOutput
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget, DraftTree
from specdecode.verify.base import Verdict

#: Match lengths are grouped for the forecast: a group starts at each of these lengths.
MATCH_GROUPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
#: The chance that a copy continues one more token, by group, before a sequence says otherwise:
#: measured over the greedy outputs of the first 34 spec-bench prompts (all six categories) of the
#: 1.5B model, 0.18, 0.43, 0.62, 0.72, 0.73, 0.85, 0.92, then 0.99 to 1.0 from 16 tokens on, over
#: 900, 300, then 50 to 170 tries per group (580 from 32 on); rounded, and kept below certainty.
PRIOR_CONTINUES = (0.2, 0.4, 0.6, 0.7, 0.75, 0.85, 0.9, 0.95, 0.95, 0.95)


class PromptLookupDrafter(Drafter):
    name = "prompt-lookup"
    supports_trees = True

    def __init__(
        self,
        max_ngram: int = 64,
        min_ngram: int = 1,
        strong_ngram: int = 3,
        weak_draft: int = 3,
        prior_weight: float = 4.0,
        tree: bool = False,
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise SpecDecodeError(
                f"prompt-lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}"
            )
        if not 1 <= strong_ngram <= max_ngram:
            # Above max_ngram, every match would count as weak and every draft would be short.
            raise SpecDecodeError(
                f"prompt-lookup needs 1 <= strong_ngram <= max_ngram, got {strong_ngram}, "
                f"{max_ngram}"
            )
        if weak_draft < 0:
            raise SpecDecodeError(f"prompt-lookup needs weak_draft >= 0, got {weak_draft}")
        if prior_weight <= 0:
            raise SpecDecodeError(f"prompt-lookup needs prior_weight > 0, got {prior_weight}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.strong_ngram = strong_ngram
        self.weak_draft = weak_draft
        self.prior_weight = prior_weight
        self.tree = tree
        self.reset()

    @classmethod
    def create(cls, options: dict[str, Any], resources: DrafterResources) -> PromptLookupDrafter:
        return cls(**options, tree=resources.tree is not None)

    def reset(self) -> None:
        groups = len(MATCH_GROUPS)
        self.tries = [0] * groups  # [group] drafts verified after a match in the group
        self.hits = [0] * groups  # [group] of which accepted
        self.last_match = 0  # match length behind the last proposal (0: none)
        self.last_depth = 0  # the last proposal's depth

    def begin(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        rng: torch.Generator | None,
        target: TargetOutput = NO_TARGET_OUTPUT,
    ) -> None:
        self.reset()

    def continues(self, match_length: int) -> float:
        """Forecast chance that a copy which has matched `match_length` tokens goes on."""
        group = _group(match_length)
        prior = self.prior_weight * PRIOR_CONTINUES[group]
        return (self.hits[group] + prior) / (self.tries[group] + self.prior_weight)

    def update(self, verdict: Verdict, target: TargetOutput = NO_TARGET_OUTPUT) -> None:
        if not self.last_match:
            return
        # Draft i was tried when drafts 1..i-1 were accepted, after a match of last_match + i - 1
        # (in a tree, the accepted path's depths, and one more below it).
        tried = min(verdict.num_accepted + 1, verdict.num_draft_nodes, self.last_depth)
        for depth in range(tried):
            group = _group(self.last_match + depth)
            self.tries[group] += 1
            self.hits[group] += depth < verdict.num_accepted
        self.last_match = 0

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        self.last_match = 0
        length = len(context)
        if budget.max_depth == 0 or length < 2:
            return DraftTree.empty()
        tokens = torch.as_tensor(context, dtype=torch.long)  # [L]
        match_length, ends = self.longest_match(tokens)
        if match_length < self.min_ngram:
            return DraftTree.empty()
        want = budget.max_depth
        if match_length < self.strong_ngram:
            want = min(want, self.weak_draft)
        if want == 0:
            return DraftTree.empty()
        self.last_match = match_length
        continues = [self.continues(match_length + depth) for depth in range(want)]
        if self.tree and budget.max_width > 1 and len(ends) > 1:
            nodes = want * budget.max_width if budget.max_nodes is None else budget.max_nodes
            if nodes == 0:
                return DraftTree.empty()
            # The copies after every occurrence, most recent first, merged into one tree.
            copies = (copy_after(tokens, end, want).tolist() for end in reversed(ends.tolist()))
            tree = DraftTree.trie(copies, budget.max_width, nodes)
            self.last_depth = int(tree.depths.max())
            confidence = torch.tensor(continues, dtype=torch.float32)[tree.depths - 1]  # [N]
            return DraftTree(tree.tokens, tree.parents, confidence=confidence)
        self.last_depth = want
        confidence = torch.tensor(continues, dtype=torch.float32)  # [want]
        return DraftTree.chain(copy_after(tokens, int(ends[-1]), want), confidence=confidence)

    def longest_match(self, tokens: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(n, ends): the longest n <= max_ngram such that the last n tokens occurred earlier, and
        the index just after each earlier occurrence (ascending). (0, empty) when the last token is
        new."""
        length = tokens.numel()
        # An occurrence ends at index `last` < length - 1, so at least one token follows it.
        last = torch.nonzero(tokens[: length - 1] == tokens[-1]).flatten()  # [M]
        matched = 0
        while last.numel() and matched < self.max_ngram:
            matched += 1
            found = last
            # Extend every surviving occurrence one token to the left.
            start = last - matched
            last = last[(start >= 0) & (tokens[start.clamp(min=0)] == tokens[length - 1 - matched])]
        if matched == 0:
            return 0, last
        return matched, found + 1


def copy_after(tokens: torch.Tensor, end: int, length: int) -> torch.Tensor:
    """The `length` tokens that follow index `end - 1` of `tokens` (the most recent occurrence is
    the drafter's choice). Where the copy reaches the present, the text repeats with period
    `len(tokens) - end`, so it goes on copying its own draft. [length]"""
    offsets = torch.arange(length) % (tokens.numel() - end)  # [length]
    return tokens[end + offsets]


def _group(match_length: int) -> int:
    """Index of the last group of MATCH_GROUPS that starts at or below `match_length`."""
    return max(0, bisect.bisect_right(MATCH_GROUPS, match_length) - 1)
