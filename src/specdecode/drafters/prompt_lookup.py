"""Prompt lookup decoding: draft the tokens that followed the last occurrence of the current suffix.

Saxena, "Prompt Lookup Decoding" (2023). Model-free: the longest n-gram (from `max_ngram` down to
`min_ngram` tokens) ending at the last committed token is searched for earlier in the prompt and the
output so far; the tokens that followed its most recent occurrence are the draft. Output that
repeats its input (code editing, summarisation, RAG) is drafted nearly for free.

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

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise SpecDecodeError(
                f"prompt-lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        length = len(context)
        want = budget.max_depth
        if want == 0 or length < 2:
            return DraftTree.empty()
        tokens = torch.as_tensor(context, dtype=torch.long)  # [L]
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            suffix = tokens[length - n :]  # [n]
            # Windows that end before the last token, so at least one token follows each.
            windows = tokens[: length - 1].unfold(0, n, 1)  # [L-n, n]
            starts = torch.nonzero((windows == suffix).all(dim=1)).flatten()
            if starts.numel() == 0:
                continue
            ends = starts + n  # index of the first token after each match
            # Prefer the most recent match that can fill the whole budget, else the most recent.
            full = ends[ends + want <= length]
            end = int(full[-1] if full.numel() else ends[-1])
            return DraftTree.chain(tokens[end : end + want])
        return DraftTree.empty()
