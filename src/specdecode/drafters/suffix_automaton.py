"""A suffix automaton of a token sequence, grown one token at a time, with a running longest match.

The automaton of a text has one state per class of substrings that end at the same set of
positions (at most 2n - 1 states for n tokens), a transition per token that extends a substring,
and a suffix link from each state to the state of its longest suffix in another class. Appending a
token is amortised O(1) (Blumer et al., 1985); so is following the text with a matcher that keeps
the longest suffix of the text so far that occurred *earlier* in it, which is what drafting by
copying needs: the tokens after that earlier occurrence are the draft.

Each state remembers where its substrings first ended (`first_end`, an index into the text): a
copy from there has as many tokens to offer as lie between it and the end of the text. Where the
text's most recent earlier occurrence is the better copy (a summary quoting the passage it is at),
`recent_continuation` copies after that instead: a map from each n-gram of up to `RECENT_NGRAM`
tokens to where it last ended, updated in O(RECENT_NGRAM) per token, gives it.
"""

from __future__ import annotations

from collections.abc import Iterable

#: The longest suffix whose most recent earlier occurrence is tracked; a longer match copies after
#: the most recent occurrence of its last RECENT_NGRAM tokens.
RECENT_NGRAM = 8


class SuffixAutomaton:
    def __init__(self) -> None:
        self.text: list[int] = []
        self.next: list[dict[int, int]] = [{}]  # per state: token -> state
        self.link: list[int] = [-1]  # per state: the state of its longest other-class suffix
        self.length: list[int] = [0]  # per state: its longest substring's length
        self.first_end: list[int] = [-1]  # per state: where its substrings first ended
        self.last = 0  # the state of the whole text
        # The matcher: the longest suffix of the text that also ended earlier in it.
        self.match_state = 0
        self.match_length = 0
        self._last_end: dict[tuple[int, ...], int] = {}  # n-gram -> where it last ended
        # [n - 1]: where the text's last n tokens ended before now (-1: nowhere)
        self._earlier_end = [-1] * RECENT_NGRAM

    @property
    def num_states(self) -> int:
        return len(self.link)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            token = int(token)
            self._follow(token)  # against the text before this token: an earlier occurrence
            self._append(token)
            self._note_recent_ends()

    def continuation(self, state: int, most: int) -> list[int]:
        """Up to `most` tokens after the first occurrence of `state`'s substrings."""
        start = self.first_end[state] + 1
        return self.text[start : start + most]

    def recent_continuation(self, most: int) -> list[int]:
        """Up to `most` tokens after the most recent earlier occurrence of the match (of its last
        RECENT_NGRAM tokens, for a longer match); [] without a match."""
        length = min(self.match_length, RECENT_NGRAM)
        if length == 0:
            return []
        start = self._earlier_end[length - 1] + 1
        return self.text[start : start + most]

    def _note_recent_ends(self) -> None:
        end = len(self.text) - 1
        for length in range(1, RECENT_NGRAM + 1):
            if length > end + 1:
                self._earlier_end[length - 1] = -1
                continue
            ngram = tuple(self.text[end + 1 - length :])
            self._earlier_end[length - 1] = self._last_end.get(ngram, -1)
            self._last_end[ngram] = end

    def shorter_with_more_to_copy(self, wanted: int, min_length: int) -> tuple[int, int]:
        """The matched state, or a shorter suffix of it (at least `min_length` tokens) whose first
        occurrence lies early enough to offer `wanted` tokens after it; (state, match length)."""
        state, length = self.match_state, self.match_length
        end = len(self.text)
        while (
            end - self.first_end[state] - 1 < wanted
            and self.link[state] > 0
            and self.length[self.link[state]] >= min_length
        ):
            state = self.link[state]
            length = self.length[state]
        return state, length

    def _follow(self, token: int) -> None:
        state, length = self.match_state, self.match_length
        while state and token not in self.next[state]:
            state = self.link[state]
            length = self.length[state]
        if token in self.next[state]:
            self.match_state, self.match_length = self.next[state][token], length + 1
        else:
            self.match_state, self.match_length = 0, 0

    def _append(self, token: int) -> None:
        position = len(self.text)
        self.text.append(token)
        current = self._new_state(self.length[self.last] + 1, position, {})
        state = self.last
        while state != -1 and token not in self.next[state]:
            self.next[state][token] = current
            state = self.link[state]
        if state == -1:
            self.link[current] = 0
        else:
            successor = self.next[state][token]
            if self.length[state] + 1 == self.length[successor]:
                self.link[current] = successor
            else:
                # The successor's class splits: its shorter substrings also end here now.
                clone = self._new_state(
                    self.length[state] + 1,
                    self.first_end[successor],
                    dict(self.next[successor]),
                )
                self.link[clone] = self.link[successor]
                while state != -1 and self.next[state].get(token) == successor:
                    self.next[state][token] = clone
                    state = self.link[state]
                self.link[successor] = self.link[current] = clone
                if self.match_state == successor and self.match_length <= self.length[clone]:
                    self.match_state = clone  # the match is among the substrings split off
        self.last = current

    def _new_state(self, length: int, first_end: int, transitions: dict[int, int]) -> int:
        self.next.append(transitions)
        self.link.append(-1)
        self.length.append(length)
        self.first_end.append(first_end)
        return len(self.link) - 1
