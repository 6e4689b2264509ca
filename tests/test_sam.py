"""The `sam` drafter (SAM-Decoding) and its suffix automaton.

- The automaton: after every appended token, its running match is the longest suffix of the text
  that ended earlier in it, and its state knows where that first ended (against brute force on
  random texts over small vocabularies, where matches are long and classes split often); it has
  at most 2n - 1 states for n tokens.
- The drafter: a match of `min_match` tokens or more drafts the copy after its first occurrence,
  a shorter suffix when that offers a longer copy; below it the fallback drafts, and hears every
  verification whoever drafted; a short match's copy and the fallback are both scored on every
  step below it, and the one that agreed with more drafts; bad options are one clear error.
- Greedy losslessness on a real model, chains and trees, with the automaton's copies accepted.
- Sampling: `certify` passes at temperature 1 (slow).
"""

from __future__ import annotations

import random

import pytest
import torch
from certified import assert_certify_passes

from specdecode import SamplingParams, SpecConfig, SpecDecoder
from specdecode.datastore import Datastore
from specdecode.drafters import DrafterResources, make_drafter
from specdecode.drafters.base import TargetOutput
from specdecode.drafters.sam import SamDrafter
from specdecode.drafters.suffix_automaton import SuffixAutomaton
from specdecode.drafters.token_recycling import TokenRecyclingDrafter
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget
from specdecode.verify.base import Verdict


def earliest_longest_match(text: list[int]) -> tuple[int, int]:
    """(length, first end) of the longest suffix of `text` that also ended earlier in it."""
    best = (0, -1)
    for length in range(1, len(text)):
        suffix = text[-length:]
        ends = [
            end
            for end in range(length - 1, len(text) - 1)
            if text[end - length + 1 : end + 1] == suffix
        ]
        if not ends:
            break
        best = (length, ends[0])
    return best


def test_the_running_match_is_the_longest_earlier_suffix() -> None:
    rng = random.Random(0)
    for trial in range(200):
        automaton, text = SuffixAutomaton(), []
        vocabulary = rng.choice([2, 3, 5])
        for _ in range(50):
            text.append(rng.randrange(vocabulary))
            automaton.extend(text[-1:])
            length, first_end = earliest_longest_match(text)
            assert automaton.match_length == length, (trial, text)
            if length:
                assert automaton.first_end[automaton.match_state] == first_end, (trial, text)
        assert automaton.num_states <= 2 * len(text) - 1


def test_a_long_match_copies_what_followed_its_first_occurrence() -> None:
    drafter = SamDrafter(min_match=2)
    context = [1, 2, 3, 4, 5, 9, 1, 2, 3]
    assert drafter.propose(context, Budget.chain(3)).tokens.tolist() == [4, 5, 9]
    # "9 1 2 3" never occurred before; "1 2 3" did, followed by 4 5 9 1 2 3: capped at 8.
    assert drafter.propose(context, Budget.chain(8)).tokens.tolist() == [4, 5, 9, 1, 2, 3]
    # One more committed token extends the match to "1 2 3 4".
    assert drafter.propose([*context, 4], Budget.chain(2)).tokens.tolist() == [5, 9]


def test_a_shorter_match_is_copied_where_the_longest_offers_too_little() -> None:
    drafter = SamDrafter(min_match=1)
    # "5 6" first ended at index 6, with 3 tokens after it; "6" first ended at 0, with 9 after.
    context = [6, 6, 1, 2, 3, 5, 6, 7, 5, 6]
    tree = drafter.propose(context, Budget.chain(4))
    assert tree.tokens.tolist() == [6, 1, 2, 3]
    strict = SamDrafter(min_match=2)
    assert strict.propose(context, Budget.chain(4)).tokens.tolist() == [7, 5, 6]


def test_the_most_recent_occurrence_is_tracked_for_ngrams_up_to_its_bound() -> None:
    automaton = SuffixAutomaton()
    automaton.extend([1, 2, 3, 9, 1, 2, 4, 1, 2])
    # "1 2" ended first at index 1 (then 3 follows), last before now at index 5 (then 4).
    assert automaton.continuation(automaton.match_state, 2) == [3, 9]
    assert automaton.recent_continuation(2) == [4, 1]
    long = list(range(20))
    automaton = SuffixAutomaton()
    automaton.extend(long + [50] + long + [60] + long)
    # A 20-token match: the most recent occurrence of its last RECENT_NGRAM tokens.
    assert automaton.match_length == 20 and automaton.recent_continuation(1) == [60]
    assert automaton.recent_continuation(1) != automaton.continuation(automaton.match_state, 1)


def test_a_copy_follows_whichever_occurrence_has_agreed_with_more_of_the_text() -> None:
    drafter = SamDrafter(min_match=2)
    context = [1, 2, 3, 8, 1, 2, 4, 7, 1, 2]  # "1 2": first followed by 3 8, last by 4 7
    chain = Budget.chain(2)
    assert drafter.propose(context, chain).tokens.tolist() == [3, 8]  # a tie: the first
    drafter.update(Verdict([], [4], 0, False))
    context += [4, 5, 6, 1, 2]  # the text went on as after the most recent occurrence, once
    # "1 2" again: first followed by 3 8, most recently by 4 5; the recent copy agreed more.
    assert drafter.propose(context, chain).tokens.tolist() == [4, 5]
    fresh = SamDrafter(min_match=2)
    fresh.begin(context, SamplingParams(), None)  # a new request starts level
    assert fresh.propose(context, chain).tokens.tolist() == [3, 8]


def test_below_min_match_the_fallback_drafts_and_hears_every_verification() -> None:
    fallback = TokenRecyclingDrafter(vocab_size=16)
    fallback.state.successors[8] = range(8)
    fallback.state.successors[0] = range(5, 13)
    drafter = SamDrafter(min_match=3, fallback=fallback)
    # "8" never occurred before: no match, so token recycling drafts its chain from 8.
    assert drafter.propose([1, 2, 9, 1, 2, 8], Budget.chain(2)).tokens.tolist() == [0, 5]
    # A copy (match "1 2 9" of 3 tokens), verified: the fallback still learns the rows.
    drafter.begin([1, 2, 9], SamplingParams(), None)
    tree = drafter.propose([1, 2, 9, 1, 2, 9], Budget.chain(2))
    assert tree.tokens.tolist() == [1, 2]
    logits = torch.zeros(3, 16)
    logits[:, 11] = 1.0
    drafter.update(
        Verdict([], [11], 2, False), TargetOutput(logits, tokens=torch.tensor([9, 1, 2]))
    )
    assert [int(fallback.state.successors[t, 0]) for t in (9, 1, 2)] == [11, 11, 11]


def test_below_min_match_a_short_copy_competes_with_the_fallback() -> None:
    def sources(fallback: TokenRecyclingDrafter, copy_is_right: bool) -> str:
        """Which drafted at each step below min_match: the copy after "1 2" (`c`, it says 0 7) or
        token recycling (`t`), as the text goes on as one of them said."""
        drafter = SamDrafter(min_match=3, fallback=fallback)
        context, drafted = [1, 2, 0, 7, 1, 2], ""
        for new in (3, 4, 5, 6, 8, 10, 11, 12, 13, 14, 15):  # "new 1 2" is new: "1 2" is short
            fallback.state.successors[2] = 9 if copy_is_right else new
            fallback.state.successors[9] = 9
            fallback.state.successors[new] = 1
            first = int(drafter.propose(context, Budget.chain(2)).tokens[0])
            drafted += "c" if first == 0 else "t"
            context += ([0, 7, new] if copy_is_right else [new, 1, new]) + [1, 2]
        return drafted

    class CostlyRecycling(TokenRecyclingDrafter):
        proposes_freely = False

    # Both are scored at every step: level at first (the copy drafts), then the one that agreed.
    assert sources(TokenRecyclingDrafter(vocab_size=16), copy_is_right=False) == "c" + "t" * 10
    assert sources(TokenRecyclingDrafter(vocab_size=16), copy_is_right=True) == "c" * 11
    # A fallback that is not consulted freely drafts every 8th step while behind, to be scored.
    assert sources(CostlyRecycling(vocab_size=16), copy_is_right=True) == "ccccccctccc"
    assert sources(CostlyRecycling(vocab_size=16), copy_is_right=False) == "c" + "t" * 10
    # Without short copies, the fallback always drafts below min_match; with no fallback, nothing.
    fallback = TokenRecyclingDrafter(vocab_size=16)
    fallback.state.successors[2] = fallback.state.successors[8] = 8
    context, chain = [1, 2, 0, 7, 6, 1, 2], Budget.chain(2)
    assert SamDrafter(min_match=3, fallback=fallback, short_copies=False).propose(
        context, chain
    ).tokens.tolist() == [8, 8]
    assert SamDrafter(min_match=3).propose(context, chain).num_nodes == 0


def test_a_path_agrees_with_as_much_of_the_text_as_it_spells() -> None:
    from specdecode.drafters.sam import agreed_path_length
    from specdecode.tree import DraftTree

    tree = DraftTree(torch.tensor([4, 5, 6, 7]), torch.tensor([-1, -1, 1, 2]))  # 4 | 5 6 7
    assert agreed_path_length(tree, [5, 6, 7, 8]) == 3
    assert agreed_path_length(tree, [5, 6]) == 2
    assert agreed_path_length(tree, [4, 6]) == 1
    assert agreed_path_length(tree, [3]) == 0
    assert agreed_path_length(DraftTree.empty(), [3]) == 0


def test_a_corpus_match_drafts_where_it_is_longer_than_the_requests_by_the_bias() -> None:
    corpus = Datastore.from_documents([[10, 11, 12, 13, 14, 15, 16, 17]] * 2 + [[13, 14, 9]], "v")
    drafter = SamDrafter(min_match=2, datastore=corpus, static_bias=2)
    # No earlier match in the request; the corpus matches "10 ... 15" (6 tokens): its copy.
    assert drafter.propose([1, 10, 11, 12, 13, 14, 15], Budget.chain(3)).tokens.tolist() == [16, 17]
    # The request's own match, "13 14" (2 tokens), against the corpus's "12 13 14" (3): within
    # the bias, the request's copy wins.
    drafter.begin([5, 13, 14, 8, 12, 13, 14], SamplingParams(), None)
    own = drafter.propose([5, 13, 14, 8, 12, 13, 14], Budget.chain(2))
    assert own.tokens.tolist() == [8, 12]


def test_the_bench_carries_sam_across_prompts_only_with_a_statistics_fallback() -> None:
    assert SamDrafter.keeps_only_model_statistics({})  # token recycling's matrix
    assert not SamDrafter.keeps_only_model_statistics({"fallback": "none"})
    assert not SamDrafter.keeps_only_model_statistics({"fallback": "suffix"})  # earlier text


def test_bad_options_are_one_clear_error() -> None:
    resources = DrafterResources(target=None)  # type: ignore[arg-type]
    with pytest.raises(SpecDecodeError, match="min_match >= 1"):
        make_drafter("sam", {"min_match": 0, "fallback": "none"}, resources)
    with pytest.raises(SpecDecodeError, match="another drafter"):
        make_drafter("sam", {"fallback": "sam"}, resources)
    with pytest.raises(SpecDecodeError, match="static_bias >= 0"):
        make_drafter("sam", {"static_bias": -1, "fallback": "none"}, resources)
    with pytest.raises(SpecDecodeError, match="unknown drafter 'nope'"):
        make_drafter("sam", {"fallback": "nope"}, resources)


@pytest.fixture(scope="module")
def llm() -> SpecDecoder:
    return SpecDecoder.load("smollm2-135m-instruct")


COPY = (
    "Here is a function:\n\ndef area(width, height):\n    return width * height\n\n"
    "Write the same function again, then write a function perimeter in the same style."
)


@pytest.mark.parametrize("tree", ["chain", "static"])
def test_greedy_is_exact_with_copies_accepted(llm: SpecDecoder, tree: str) -> None:
    llm.engine.drafter_state.clear()
    sampling = SamplingParams(max_new_tokens=64)
    plain = llm.generate(COPY, sampling, SpecConfig(drafter="none"))
    # The copies alone (no fallback), then with token recycling below a 2-token match.
    # (With token recycling, 1.39 tokens per forward on the chain at commit 28d3f31: this code
    # repeats little after 1-token matches, whose copies draft first below min_match.)
    for fallback, least in (("none", 1.25), ("token-recycling", 1.3)):
        options = {"fallback": fallback}
        # The heuristic controller: the default one sizes drafts from timings, which a busy
        # machine would make vary.
        spec = SpecConfig(
            drafter="sam",
            tree=tree,
            tree_width=4,
            tree_nodes=16,
            controller="heuristic",
            drafter_options=options,
        )
        fast = llm.generate(COPY, sampling, spec)
        assert fast.token_ids == plain.token_ids, fallback
        assert fast.stats.mean_accepted_tokens > least, fallback


@pytest.mark.slow
def test_sampling_passes_certify(llm: SpecDecoder) -> None:
    assert_certify_passes(llm, SpecConfig(drafter="sam", controller="fixed", num_draft_tokens=3))
