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
`weak_draft = 3` fits a 4-row forward (the last token and three drafts): on the llamacpp backend's
exact kernels that costs what a single token does, on the torch backend about 30% more.

Drafts are deterministic, so they carry no `draft_probs` (a point-mass proposal).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specdecode.drafters.base import Drafter
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget, DraftTree


class PromptLookupDrafter(Drafter):
    name = "prompt-lookup"

    def __init__(
        self,
        max_ngram: int = 64,
        min_ngram: int = 1,
        strong_ngram: int = 3,
        weak_draft: int = 3,
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
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.strong_ngram = strong_ngram
        self.weak_draft = weak_draft

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
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
        # Copy what followed the most recent occurrence. Where that copy reaches the present (the
        # text repeats with period `length - end`), it goes on copying its own draft.
        end = int(ends[-1])
        offsets = torch.arange(want) % (length - end)  # [want]
        return DraftTree.chain(tokens[end + offsets])

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
