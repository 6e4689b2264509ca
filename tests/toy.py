"""A toy language model for fast engine tests, in the spirit of nanochat's mock model.

`ToyBackend` keeps a real (list-based) cache of (token, position) pairs and computes each new
token's logits from the tokens it can see: the cached ones plus, among the new ones, those the tree
mask allows. Its logits are a fixed pseudo-random function of the last `order` visible tokens, so a
bookkeeping bug in the engine (a wrong mask, position or commit) changes the output, and the exact
distribution of a sequence is easy to compute for `order=1`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from specdecode.backends.base import Backend


class ToyBackend(Backend):
    def __init__(
        self,
        vocab_size: int = 8,
        seed: int = 0,
        order: int = 3,
        sharpness: float = 2.0,
        max_context: int = 512,
    ) -> None:
        super().__init__(vocab_size, max_context)
        self.seed = seed
        self.order = order
        self.sharpness = sharpness
        self.cache: list[int] = []
        self.forward_sizes: list[int] = []

    @property
    def num_cached(self) -> int:
        return len(self.cache)

    def logits_after(self, visible: Sequence[int]) -> torch.Tensor:  # [V]
        key = bytes(str((self.seed, tuple(visible[-self.order :]))), "ascii")
        gen = torch.Generator().manual_seed(zlib.crc32(key))
        return torch.randn(self.vocab_size, generator=gen) * self.sharpness

    def forward(self, token_ids, positions=None, tree_mask=None, return_logits=True):
        ids = token_ids.tolist()
        count = len(ids)
        if positions is None:
            positions = torch.arange(self.num_cached, self.num_cached + count)
        if tree_mask is None:
            tree_mask = torch.ones(count, count, dtype=torch.bool).tril()
        span = tree_mask.shape[1]  # the mask covers the last span - count cached slots too
        fixed = self.cache[: len(self.cache) - (span - count)]
        window = self.cache[len(fixed) :] + ids
        rows = []
        for i in range(count):
            visible = fixed + [window[j] for j in range(span) if tree_mask[i, j]]
            assert int(positions[i]) == len(visible) - 1, "position does not match visible prefix"
            rows.append(self.logits_after(visible))
        self.forward_sizes.append(count)
        self.cache.extend(ids)
        return torch.stack(rows) if return_logits else None

    def truncate(self, length: int) -> None:
        del self.cache[length:]

    def keep(self, start: int, offsets: Sequence[int]) -> None:
        kept = [self.cache[start + o] for o in offsets]
        self.cache[start:] = kept

    def reset(self) -> None:
        super().reset()
        self.forward_sizes.clear()


def plain_greedy(model: ToyBackend, prompt: Sequence[int], count: int) -> list[int]:
    """Reference greedy decoding of the toy model that never touches the engine."""
    seq = list(prompt)
    for _ in range(count):
        seq.append(int(model.logits_after(seq).argmax()))
    return seq[len(prompt) :]


class ToyTokenizer:
    """Token i is the letter chr(ord('a') + i); token `eos` ends the sequence."""

    def __init__(self, eos: int | None = None) -> None:
        self.eos_token_ids = frozenset() if eos is None else frozenset({eos})

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(ord("a") + i) for i in ids)
