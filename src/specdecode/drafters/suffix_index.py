"""Token sequences indexed for suffix matching: the structure behind the `suffix` drafter.

SuffixDecoding keeps a suffix tree whose node for a string s counts the occurrences of s; a
draft follows the children with the highest counts below the node of the context's longest
matched suffix. The same counts come from the occurrences themselves: this index stores the
sequences end to end in one token buffer (a separator between them, which matches nothing) and,
for every token id, the positions where it occurs. The longest match of a context's suffix is
found by narrowing the last token's occurrences one token to the left at a time, and a node's
children are its occurrences' next tokens, grouped (`SuffixIndex.children`). Memory is a few
bytes per token, against tens of nodes per token for a suffix tree of depth 24 in Python.

The index holds at most `max_tokens` tokens: the oldest sequences are evicted first (first in,
first out, as Arctic Inference's cache does). Eviction moves a start mark; positions below it
are skipped, and the buffer and position lists are rebuilt once the dead part outgrows the live.
"""

from __future__ import annotations

import zipfile
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from specdecode.errors import SpecDecodeError

#: Between sequences in the buffer: not a token id, so no match crosses it.
SEPARATOR = -1
#: At most this many of a suffix's most recent occurrences are counted.
MAX_OCCURRENCES = 4096


class SuffixIndex:
    """Sequences of token ids, appended to the newest one, searchable by suffix."""

    def __init__(self, max_tokens: int | None = None) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise SpecDecodeError(f"a suffix index holds at least 1 token, got {max_tokens}")
        self.max_tokens = max_tokens
        self._tokens = np.full(1024, SEPARATOR, dtype=np.int32)  # [capacity]
        self._size = 0  # buffer slots in use
        self._start = 0  # slots before it are evicted
        self._occurrences: dict[int, list] = {}  # token -> [positions array, count]
        self._sequences: deque[int] = deque()  # each live sequence's first slot, oldest first
        self._open = False  # whether the newest sequence takes appends

    # ---- filling -------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """Live tokens (separators not counted)."""
        return self._size - self._start - len(self._sequences)

    @property
    def nbytes(self) -> int:
        """What the buffer and the position lists take."""
        lists = sum(positions.nbytes for positions, _ in self._occurrences.values())
        return self._tokens.nbytes + lists

    def start_sequence(self) -> None:
        self._put(SEPARATOR)
        self._sequences.append(self._size)
        self._open = True

    def extend(self, tokens: Sequence[int]) -> None:
        """Append to the newest sequence (a new one if none is open)."""
        if not self._open:
            self.start_sequence()
        for token in tokens:
            self._put(int(token))
        self._evict()

    def add_sequence(self, tokens: Sequence[int]) -> None:
        """Append a whole sequence."""
        self.start_sequence()
        self.extend(tokens)
        self._open = False

    def _put(self, token: int) -> None:
        if self._size == len(self._tokens):
            grown = np.full(2 * len(self._tokens), SEPARATOR, dtype=np.int32)
            grown[: self._size] = self._tokens[: self._size]
            self._tokens = grown
        position = self._size
        self._tokens[position] = token
        self._size += 1
        if token == SEPARATOR:
            return
        entry = self._occurrences.get(token)
        if entry is None:
            entry = self._occurrences[token] = [np.empty(4, dtype=np.int32), 0]
        positions, count = entry
        if count == len(positions):
            positions = entry[0] = np.resize(positions, 2 * count)
        positions[count] = position
        entry[1] = count + 1

    def _evict(self) -> None:
        if self.max_tokens is None:
            return
        while self.num_tokens > self.max_tokens and len(self._sequences) > 1:
            self._sequences.popleft()
            self._start = self._sequences[0] - 1  # from the next sequence's separator
        if self.num_tokens > self.max_tokens:  # one sequence longer than the bound: its oldest part
            self._start = self._size - self.max_tokens - 1
            self._sequences[0] = self._start + 1
            self._tokens[self._start] = SEPARATOR
        if self._start > self._size - self._start:
            self._rebuild()

    def _rebuild(self) -> None:
        """Drop the evicted part for good: the live buffer moves to the front."""
        live = self._tokens[self._start : self._size].copy()
        firsts = [first - self._start for first in self._sequences]
        self._tokens = np.full(max(1024, 2 * len(live)), SEPARATOR, dtype=np.int32)
        self._size = self._start = 0
        self._occurrences = {}
        self._sequences = deque()
        for token in live.tolist():
            self._put(token)
        self._sequences = deque(firsts)

    # ---- searching -----------------------------------------------------------------------------

    def longest_match(self, context: Sequence[int], max_length: int) -> tuple[int, np.ndarray]:
        """(m, ends): the longest m <= max_length such that the last m tokens of `context`
        occur in the index with a token after them, and the position of the last token of each
        such occurrence (its most recent MAX_OCCURRENCES, ascending). (0, empty) when none."""
        if not context:
            return 0, np.empty(0, dtype=np.int32)
        entry = self._occurrences.get(int(context[-1]))
        if entry is None:
            return 0, np.empty(0, dtype=np.int32)
        positions = entry[0][: entry[1]]
        positions = positions[positions > self._start]  # _start holds a separator
        # Something must follow: not the buffer's end, not a separator.
        positions = positions[positions + 1 < self._size]
        positions = positions[self._tokens[positions + 1] != SEPARATOR]
        if positions.size == 0:
            return 0, positions
        matched = 1
        limit = min(max_length, len(context))
        while matched < limit:
            before = positions - matched
            keep = self._tokens[np.maximum(before, 0)] == int(context[-1 - matched])
            keep &= before > self._start
            if not keep.any():
                break
            positions = positions[keep]
            matched += 1
        return matched, positions[-MAX_OCCURRENCES:]

    def children(self, ends: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """What followed the occurrences ending at `ends`: (token, the occurrences extended by it)
        for each next token, most frequent first. Occurrences at a sequence's end have none."""
        following = ends + 1
        following = following[following < self._size]
        tokens = self._tokens[following]
        following, tokens = following[tokens != SEPARATOR], tokens[tokens != SEPARATOR]
        if tokens.size == 0:
            return []
        values, inverse, counts = np.unique(tokens, return_inverse=True, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        return [(int(values[i]), following[inverse == i]) for i in order]

    # ---- saving --------------------------------------------------------------------------------

    def save(self, path: Path, identity: str) -> None:
        """Write the live sequences and `identity` (the tokenizer's) to `path`, atomically."""
        path = Path(path)
        part = path.with_name(path.name + ".part")
        live = self._tokens[self._start : self._size]
        with part.open("wb") as file:
            np.savez(file, tokens=live, identity=np.array(identity))
        part.replace(path)

    @classmethod
    def load(cls, path: Path, identity: str, max_tokens: int | None) -> SuffixIndex:
        """The index saved at `path`, refused in one line when it is unreadable or was made with
        another tokenizer."""
        try:
            with np.load(Path(path), allow_pickle=False) as saved:
                tokens, saved_identity = saved["tokens"], str(saved["identity"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise SpecDecodeError(
                f"cannot read the suffix cache {path}: {exc}; delete it or give another cache_file"
            ) from None
        if tokens.ndim != 1 or (tokens.size and tokens[0] != SEPARATOR) or (tokens < -1).any():
            raise SpecDecodeError(
                f"{path} is not a suffix cache (its tokens are malformed); delete it or give "
                "another file (--suffix-cache)"
            )
        if saved_identity != identity:
            raise SpecDecodeError(
                f"the suffix cache {path} was made with another tokenizer: give another file "
                "(--suffix-cache) for this model"
            )
        index = cls(max_tokens)
        for token in tokens.tolist():
            if token == SEPARATOR:
                index.start_sequence()
            else:
                index._put(token)
        index._open = False
        index._evict()
        return index
