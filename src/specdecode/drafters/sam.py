"""SAM-Decoding: copy after the longest earlier match, found by a suffix automaton; else fall back.

Hu et al., "SAM Decoding: Speculative Decoding via Suffix Automaton" (ACL 2025). A suffix
automaton of the request's prompt and output grows with each committed token and keeps, in
amortised constant time, the longest suffix of the text that occurred earlier in it: the exact
longest match, where prompt lookup searches n-grams. The draft is what followed that match's
first occurrence (or a shorter suffix's, whose first occurrence offers a longer copy), or what
followed its most recent earlier occurrence: each step scores both copies against the tokens that
were then committed, and the one that has agreed with more of them in this request drafts (the
first occurrence on a tie). Code that repeats its prompt is copied best from the first
occurrence; summaries and RAG answers from the most recent one (on spec-bench's outputs, 8% more
tokens per forward on completion for the first, 2% more on RAG for the most recent).

With `datastore` (a corpus indexed by `specdecode datastore build`, as for `rest`), the longest
suffix of the text that occurs in the corpus is found too, and drafts (its most frequent
continuation) where it is longer than the request's own match by more than `static_bias` tokens
(the paper's preference for the request's own text). The paper keeps a second, static automaton of
the corpus; the datastore's memory-mapped suffix array finds the same longest match in O(log n)
steps, with no automaton to hold in memory, and serves `rest` from the same file.

A short match is a weak guess. Below `min_match` tokens the draft comes from the `fallback`
drafter instead (by default `token-recycling`, the paper's best model-free pairing; `none`: no
draft), which hears every verification, whoever drafted it. With `--tree`, the fallback drafts
trees and a long match its chain. Copies are deterministic (point-mass proposals).

Which guess is the better one below `min_match` depends on the text: where the answer quotes its
prompt (summaries, RAG), the copy after a one-token match is right more often than the model's
recycled successors; where it reasons (math, chat), less often. With `short_copies`, a short
match's copy competes with the fallback: each such step drafts from whichever has agreed with more
of the committed text per step in this request so far (both start level, worth `PRIOR_STEPS`
steps; a tie goes to the copy, which on spec-bench's summaries and RAG answers drafts more than a
tie to the fallback, and on code that repeats little of its prompt less). Both are scored on
every such step, the one not drafted too, against the tokens the target then committed: the copy
always (it is a lookup), the fallback where it `proposes_freely` (token recycling). A fallback
that costs a model call is scored only when it drafts, and drafts every `EXPLORE_EVERY`-th such
step while behind, so that its score stays current.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from specdecode.config import SamplingParams
from specdecode.datastore import Datastore
from specdecode.drafters.base import NO_TARGET_OUTPUT, Drafter, DrafterResources, TargetOutput
from specdecode.drafters.rest import frequent_trie
from specdecode.drafters.suffix_automaton import SuffixAutomaton
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget, DraftTree
from specdecode.verify.base import Verdict

#: The tokens each source (a short match's copy, the fallback) is assumed to agree with per step
#: before the request says otherwise, and how many steps that assumption is worth.
PRIOR_AGREED = 0.5
PRIOR_STEPS = 2.0
#: Every this many steps below `min_match`, a fallback that is behind and not consulted freely
#: drafts once.
EXPLORE_EVERY = 8
SHORT, FALLBACK = 0, 1
FIRST_OCCURRENCE, RECENT_OCCURRENCE = 0, 1


class SamDrafter(Drafter):
    name = "sam"
    supports_trees = True

    def __init__(
        self,
        min_match: int = 2,
        fallback: Drafter | None = None,
        datastore: Datastore | None = None,
        static_bias: int = 4,
        max_static_match: int = 32,
        short_copies: bool = True,
    ) -> None:
        if min_match < 1:
            raise SpecDecodeError(f"sam needs min_match >= 1, got {min_match}")
        if static_bias < 0 or max_static_match < 1:
            raise SpecDecodeError(
                f"sam needs static_bias >= 0 and max_static_match >= 1, got {static_bias}, "
                f"{max_static_match}"
            )
        self.min_match = min_match
        self.fallback = fallback
        self.datastore = datastore
        self.static_bias = static_bias
        self.max_static_match = max_static_match
        self.short_copies = short_copies
        self.reset()

    @classmethod
    def keeps_only_model_statistics(cls, options: dict[str, Any]) -> bool:
        """Its automaton is per request; what lasts across requests is its fallback's."""
        from specdecode.drafters import DRAFTERS

        fallback = options.get("fallback", "token-recycling")
        if fallback not in DRAFTERS or fallback in ("none", cls.name):
            return False
        return DRAFTERS[fallback].keeps_only_model_statistics(options.get("fallback_options", {}))

    @classmethod
    def create(cls, options: dict[str, Any], resources: DrafterResources) -> SamDrafter:
        from specdecode.drafters import make_drafter  # the registry imports this module

        options = dict(options)
        path = options.pop("datastore", None)
        if path is not None:
            options["datastore"] = Datastore.shared(resources.shared, path, resources.vocabulary)
        fallback_name = options.pop("fallback", "token-recycling")
        if fallback_name == cls.name:
            raise SpecDecodeError("sam's fallback must be another drafter, not sam")
        fallback = None
        if fallback_name != "none":
            fallback = make_drafter(fallback_name, options.pop("fallback_options", {}), resources)
        return cls(**options, fallback=fallback)

    def reset(self) -> None:
        self._begin_request()
        if self.fallback is not None:
            self.fallback.reset()

    def _begin_request(self) -> None:
        self.automaton = SuffixAutomaton()
        # [source] steps below min_match each source was scored on, and the tokens it agreed with
        self.short_steps = [0, 0]
        self.short_agreed = [0, 0]
        self.short_turns = 0
        # (text length, [source] proposal or None where not made) of the last step below min_match
        self.short_proposals: tuple[int, list[DraftTree | None]] | None = None
        # [occurrence] tokens each copy agreed with of those committed after it was proposed
        self.copy_agreed = [0, 0]
        # (text length, first occurrence's copy, most recent's) of the last copy proposed
        self.copies: tuple[int, list[int], list[int]] | None = None

    def begin(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        rng: torch.Generator | None,
        target: TargetOutput = NO_TARGET_OUTPUT,
    ) -> None:
        self._begin_request()
        if self.fallback is not None:
            self.fallback.begin(prompt, sampling, rng, target)

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        automaton = self.automaton
        automaton.extend(context[len(automaton.text) :])
        self._score_copies()
        self._score_short_proposals()
        wanted = min(budget.max_depth, budget.max_nodes or 0)
        if wanted == 0:
            return DraftTree.empty()
        if self.datastore is not None:
            matched, lo, hi = self.datastore.longest_match(context, self.max_static_match)
            if matched >= self.min_match and matched - self.static_bias > automaton.match_length:
                copies = self.datastore.continuations(lo, hi, matched, wanted, 256)
                tree = frequent_trie(copies, wanted, width=1)
                if tree.num_nodes:  # every copy may end with its document
                    return tree
        if automaton.match_length >= self.min_match:
            return self._copy(wanted, self.min_match)
        if self.fallback is None:
            return DraftTree.empty()
        if self.short_copies and automaton.match_length > 0:
            return self._short_step(context, budget, wanted)
        return self.fallback.propose(context, budget)

    def _short_step(self, context: Sequence[int], budget: Budget, wanted: int) -> DraftTree:
        """Below min_match: the short match's copy or the fallback's draft (see the module)."""
        assert self.fallback is not None
        copy = self._copy(wanted, 1)
        consulted = self.fallback.proposes_freely
        source = self._short_source(explore=not consulted)
        fallback = None
        if consulted or source == FALLBACK:
            fallback = self.fallback.propose(context, budget)
        self.short_proposals = (len(self.automaton.text), [copy, fallback])
        return copy if source == SHORT else fallback

    def _copy(self, wanted: int, min_length: int) -> DraftTree:
        automaton = self.automaton
        state, _ = automaton.shorter_with_more_to_copy(wanted, min_length)
        first = automaton.continuation(state, wanted)
        recent = automaton.recent_continuation(wanted)
        self.copies = (len(automaton.text), first, recent)
        ahead = self.copy_agreed[RECENT_OCCURRENCE] > self.copy_agreed[FIRST_OCCURRENCE]
        return DraftTree.chain(recent if ahead and recent else first)

    def _score_copies(self) -> None:
        """Credits each copy of the last step with the committed tokens it agreed with."""
        if self.copies is None:
            return
        start, first, recent = self.copies
        self.copies = None
        if first == recent:
            return
        committed = self.automaton.text[start:]
        for occurrence, copy in ((FIRST_OCCURRENCE, first), (RECENT_OCCURRENCE, recent)):
            agreed = 0
            while agreed < min(len(copy), len(committed)) and copy[agreed] == committed[agreed]:
                agreed += 1
            self.copy_agreed[occurrence] += agreed

    def _score_short_proposals(self) -> None:
        """Credits each proposal of the last step below min_match with the committed tokens one
        of its paths agreed with (where the drafted one was cut short, the other may agree with
        one token more: the target's own, which shows it would have gone further)."""
        if self.short_proposals is None:
            return
        start, proposals = self.short_proposals
        self.short_proposals = None
        committed = self.automaton.text[start:]
        for source, proposal in enumerate(proposals):
            if proposal is not None:
                self.short_steps[source] += 1
                self.short_agreed[source] += agreed_path_length(proposal, committed)

    def _short_source(self, explore: bool) -> int:
        """The source that has agreed with more per step below min_match in this request, or,
        with `explore`, every EXPLORE_EVERY-th step the fallback where it is behind."""
        per_step = [
            (agreed + PRIOR_AGREED * PRIOR_STEPS) / (steps + PRIOR_STEPS)
            for agreed, steps in zip(self.short_agreed, self.short_steps, strict=True)
        ]
        ahead = SHORT if per_step[SHORT] >= per_step[FALLBACK] else FALLBACK
        self.short_turns += 1
        if explore and ahead == SHORT and self.short_turns % EXPLORE_EVERY == 0:
            return FALLBACK
        return ahead

    def update(self, verdict: Verdict, target: TargetOutput = NO_TARGET_OUTPUT) -> None:
        if self.fallback is not None:
            self.fallback.update(verdict, target)

    def end(self, context: Sequence[int]) -> None:
        if self.fallback is not None:
            self.fallback.end(context)


def agreed_path_length(tree: DraftTree, committed: Sequence[int]) -> int:
    """How many of `committed` a root path of `tree` spells from its start."""
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    at, length = -1, 0
    while length < len(committed):
        children = [n for n, parent in enumerate(parents) if parent == at]
        matching = [n for n in children if tokens[n] == committed[length]]
        if not matching:
            break
        at, length = matching[0], length + 1
    return length
