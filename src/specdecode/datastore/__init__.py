"""A datastore: a corpus of token ids and its suffix array, in one memory-mapped file.

REST (He et al., "REST: Retrieval-Based Speculative Decoding", NAACL 2024) drafts what followed
the current suffix of the text in a large corpus. The corpus is tokenized once by
`specdecode datastore build FILES... --out FILE` (each file a document; documents are separated
so that no match or continuation crosses from one into the next) and its suffix array, the
corpus positions sorted by the text that starts there, is built alongside. All the occurrences of
a pattern are then one contiguous range of the suffix array, found by binary search, and the
longest suffix of a context that occurs anywhere in the corpus by a binary search over its length.

The file: a 4096-byte header (a magic line, then JSON: format version, tokenizer fingerprint,
model, counts), the corpus (int32, separators -1), the suffix array (int32). It is read through
`numpy.memmap`, so a corpus of many millions of tokens costs page cache, not process memory, and
loads instantly. A datastore made with another tokenizer is refused: its ids mean other text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from specdecode.errors import SpecDecodeError

MAGIC = b"specdecode datastore\n"
VERSION = 1
HEADER_BYTES = 4096
SEPARATOR = -1


def suffix_array(tokens: np.ndarray, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """The positions of `tokens` sorted by the sequence that starts at each (a sequence that ends
    sorts before its longer extensions; a separator before every token), by prefix doubling:
    each round sorts by the ranks of the first 2k tokens from those of the first k. [n] int32"""
    n = tokens.size
    rank = tokens.astype(np.int64) + 1  # separators (-1) rank 0, below every token
    width = 1
    while True:
        following = np.zeros(n, dtype=np.int64)  # rank of the next `width` tokens, 0 past the end
        if width < n:
            following[: n - width] = rank[width:] + 1
        order = np.lexsort((following, rank))
        ranked = np.stack([rank[order], following[order]])
        starts = np.concatenate([[True], np.any(ranked[:, 1:] != ranked[:, :-1], axis=0)])
        new_rank = np.empty(n, dtype=np.int64)
        new_rank[order] = np.cumsum(starts)
        rank = new_rank
        if progress is not None:
            progress(width)
        if starts.all() or width >= n:
            return order.astype(np.int32)
        width *= 2


class Datastore:
    def __init__(self, tokens: np.ndarray, suffixes: np.ndarray, vocabulary: str, model: str):
        self.tokens = tokens  # [n] int32, documents separated by -1
        self.suffixes = suffixes  # [n] int32, the suffix array
        self.vocabulary = vocabulary
        self.model = model

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    @classmethod
    def from_documents(
        cls, documents: Iterable[Sequence[int]], vocabulary: str, model: str = ""
    ) -> Datastore:
        pieces: list[np.ndarray] = []
        for document in documents:
            if len(document):
                pieces += [np.asarray(document, dtype=np.int32), np.array([SEPARATOR], np.int32)]
        if not pieces:
            raise SpecDecodeError("the corpus has no text: give files with some text in them")
        tokens = np.concatenate(pieces)
        if tokens.size >= 2**31:  # positions are int32
            raise SpecDecodeError(
                f"the corpus has {tokens.size:,} tokens; a datastore holds fewer than 2**31: "
                "split it into several"
            )
        return cls(tokens, suffix_array(tokens), vocabulary, model)

    def save(self, path: Path) -> None:
        """Write the file atomically: a half-written datastore never takes the name."""
        header = {
            "version": VERSION,
            "vocabulary": self.vocabulary,
            "model": self.model,
            "tokens": self.num_tokens,
        }
        head = MAGIC + json.dumps(header).encode() + b"\n"
        if len(head) > HEADER_BYTES:
            raise SpecDecodeError("datastore header too long: use a shorter model name")
        partial = path.with_name(path.name + ".partial")
        try:
            with open(partial, "wb") as out:
                out.write(head.ljust(HEADER_BYTES, b"\0"))
                out.write(np.ascontiguousarray(self.tokens, dtype=np.int32).tobytes())
                out.write(np.ascontiguousarray(self.suffixes, dtype=np.int32).tobytes())
            os.replace(partial, path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise SpecDecodeError(f"cannot write the datastore {path}: {exc.strerror}") from None

    @classmethod
    def load(cls, path: str | Path, vocabulary: str) -> Datastore:
        """Memory-map a datastore; refused when another tokenizer made it."""
        path = Path(path).expanduser()
        try:
            with open(path, "rb") as file:
                head = file.read(HEADER_BYTES)
        except OSError as exc:
            raise SpecDecodeError(f"cannot read the datastore {path}: {exc.strerror}") from None
        if not head.startswith(MAGIC):
            raise SpecDecodeError(
                f"{path} is not a datastore: make one with `specdecode datastore build`"
            )
        try:
            header = json.loads(head[len(MAGIC) :].split(b"\n", 1)[0])
            count = int(header["tokens"])
        except (ValueError, KeyError, TypeError):
            raise SpecDecodeError(f"the datastore {path} is damaged: build it again") from None
        if header.get("version") != VERSION:
            raise SpecDecodeError(
                f"the datastore {path} has format {header.get('version')}, this version reads "
                f"{VERSION}: build it again"
            )
        if vocabulary and header.get("vocabulary") != vocabulary:
            raise SpecDecodeError(
                f"the datastore {path} was built with another tokenizer "
                f"({header.get('model') or 'unknown model'}): build one with this model's"
            )
        if path.stat().st_size != HEADER_BYTES + 8 * count:
            raise SpecDecodeError(f"the datastore {path} is truncated: build it again")
        tokens = np.memmap(path, np.int32, "r", HEADER_BYTES, (count,))
        suffixes = np.memmap(path, np.int32, "r", HEADER_BYTES + 4 * count, (count,))
        return cls(tokens, suffixes, header.get("vocabulary", ""), header.get("model", ""))

    @classmethod
    def shared(cls, state: dict, path: str | Path, vocabulary: str) -> Datastore:
        """The datastore at `path`, mapped once per engine (`state` is its `drafter_state`) and
        shared by every drafter and request that reads it."""
        key = f"datastore:{Path(path).expanduser()}"
        if key not in state:
            state[key] = cls.load(path, vocabulary)
        return state[key]

    @staticmethod
    def check(path: str | Path) -> None:
        """Refuse, before a model loads, a path that is not a readable datastore (the tokenizer
        is checked when it is loaded)."""
        path = Path(path).expanduser()
        try:
            with open(path, "rb") as file:
                head = file.read(len(MAGIC))
        except OSError as exc:
            raise SpecDecodeError(f"cannot read the datastore {path}: {exc.strerror}") from None
        if head != MAGIC:
            raise SpecDecodeError(
                f"{path} is not a datastore: make one with `specdecode datastore build`"
            )

    def occurrences(self, pattern: Sequence[int]) -> tuple[int, int]:
        """The range [lo, hi) of the suffix array whose suffixes start with `pattern`."""
        target = np.asarray(pattern, dtype=np.int32)
        return self._bound(target, upper=False), self._bound(target, upper=True)

    def longest_match(self, context: Sequence[int], max_length: int) -> tuple[int, int, int]:
        """(length, lo, hi): the longest suffix of `context`, at most `max_length` tokens, that
        occurs in the corpus, and its range of the suffix array; (0, 0, 0) when none does.
        Occurring is monotone in the length (a suffix of an occurrence occurs), so the length
        is found by binary search."""
        shortest, longest = 0, min(max_length, len(context))
        found = (0, 0, 0)
        while shortest < longest:
            length = (shortest + longest + 1) // 2
            lo, hi = self.occurrences(context[-length:])
            if lo < hi:
                shortest, found = length, (length, lo, hi)
            else:
                longest = length - 1
        return found

    def continuations(
        self, lo: int, hi: int, offset: int, depth: int, most: int
    ) -> list[list[int]]:
        """What follows up to `most` of the occurrences in [lo, hi) (spread evenly over the
        range, which is sorted by what follows, so the sample keeps its proportions), `offset`
        tokens after each start, at most `depth` tokens, cut at the end of its document."""
        count = hi - lo
        picks = np.arange(lo, hi) if count <= most else lo + (np.arange(most) * count) // most
        out = []
        for start in self.suffixes[picks].tolist():
            following = self.tokens[start + offset : start + offset + depth]
            ends = np.flatnonzero(following == SEPARATOR)
            out.append(following[: ends[0] if ends.size else following.size].tolist())
        return out

    def _bound(self, pattern: np.ndarray, upper: bool) -> int:
        """The first suffix-array index whose suffix sorts after `pattern` (upper) or at or after
        it (lower), comparing only the pattern's length of each suffix."""
        lo, hi = 0, self.num_tokens
        width = pattern.size
        while lo < hi:
            middle = (lo + hi) // 2
            start = int(self.suffixes[middle])
            piece = self.tokens[start : start + width]
            comparison = _compare(piece, pattern)
            if comparison < 0 or (upper and comparison == 0):
                lo = middle + 1
            else:
                hi = middle
        return lo


def _compare(piece: np.ndarray, pattern: np.ndarray) -> int:
    """-1, 0, 1 as `piece` (a suffix's first tokens, possibly fewer, possibly running into a
    separator) sorts before, equal to, or after `pattern`."""
    common = min(piece.size, pattern.size)
    differ = np.flatnonzero(piece[:common] != pattern[:common])
    if differ.size:
        first = differ[0]
        return -1 if piece[first] < pattern[first] else 1
    return 0 if piece.size >= pattern.size else -1
