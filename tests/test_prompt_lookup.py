"""Prompt lookup's match search and draft length (fast, no model)."""

from __future__ import annotations

import random

import pytest
import torch
from scripts import load_benchmark_script

from specdecode.drafters.prompt_lookup import PRIOR_CONTINUES, PromptLookupDrafter, _group
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget
from specdecode.verify.base import Verdict


def brute_force_match(context: list[int], max_ngram: int) -> tuple[int, int | None]:
    """(n, end) for the longest recurring suffix, scanning every length and start."""
    best: tuple[int, int | None] = (0, None)
    for n in range(1, min(max_ngram, len(context) - 1) + 1):
        suffix = context[-n:]
        starts = [s for s in range(len(context) - n) if context[s : s + n] == suffix]
        if not starts:
            break
        best = (n, starts[-1] + n)
    return best


def drafted(drafter: PromptLookupDrafter, context: list[int], depth: int) -> list[int]:
    return drafter.propose(context, Budget.chain(depth)).tokens.tolist()


def test_longest_match_agrees_with_brute_force() -> None:
    rng = random.Random(0)
    drafter = PromptLookupDrafter(max_ngram=6)
    for _ in range(2000):
        vocab = rng.choice([2, 3, 5, 20])
        context = [rng.randrange(vocab) for _ in range(rng.randint(2, 40))]
        length, ends = drafter.longest_match(torch.tensor(context))
        want_length, want_end = brute_force_match(context, 6)
        assert length == want_length, context
        if length:
            assert int(ends[-1]) == want_end, context


def test_a_long_match_drafts_the_budget_from_its_most_recent_occurrence() -> None:
    passage = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    context = passage + [1, 2] + passage[:4]
    assert drafted(PromptLookupDrafter(), context, 5) == passage[4:9]
    # [10, 11, 12] occurred twice before: the later copy, followed by 2, wins.
    context = passage + [1] + passage[:3] + [2] + passage[:3]
    assert drafted(PromptLookupDrafter(), context, 4) == [2, 10, 11, 12]


def test_a_copy_that_reaches_the_present_repeats_its_period() -> None:
    context = [7, 8, 1, 2, 3, 1, 2, 3, 1, 2]  # period 3, the longest match ends 3 tokens back
    assert drafted(PromptLookupDrafter(), context, 7) == [3, 1, 2, 3, 1, 2, 3]


def test_a_weak_match_drafts_at_most_weak_draft_tokens() -> None:
    context = [5, 6, 7, 8, 9, 10, 11, 12, 3, 5]  # only the last token recurs
    assert drafted(PromptLookupDrafter(), context, 8) == [6, 7, 8]
    assert drafted(PromptLookupDrafter(weak_draft=1), context, 8) == [6]
    assert drafted(PromptLookupDrafter(weak_draft=0), context, 8) == []
    # A 1-token match counts as strong when strong_ngram is 1.
    assert drafted(PromptLookupDrafter(strong_ngram=1), context, 8) == [6, 7, 8, 9, 10, 11, 12, 3]
    # The budget still caps a weak draft.
    assert drafted(PromptLookupDrafter(), context, 2) == [6, 7]


def test_a_tree_merges_the_copies_of_every_occurrence() -> None:
    drafter = PromptLookupDrafter(tree=True)
    # "1 2" occurred three times, followed by 3 4, 3 5 and 6 7; the most recent copy comes first.
    context = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 6, 7, 9, 1, 2]
    tree = drafter.propose(context, Budget(max_depth=2, max_width=2, max_nodes=8))
    assert tree.tokens.tolist() == [6, 7, 3, 5, 4]  # copies 6 7, then 3 5, then 3 4 (shares 3)
    assert tree.parents.tolist() == [-1, 0, -1, 2, 2]
    # Two children at most per node: the third copy (3 1) has no room at the root.
    parted = drafter.propose([1, 2, 3, 1, 2, 4, 1, 2, 5, 1, 2], Budget(2, 2, 8))
    assert parted.tokens.tolist() == [5, 1, 4, 1] and parted.parents.tolist() == [-1, 0, -1, 2]
    # The node budget cuts the tree; a chain budget keeps the chain of the most recent copy.
    assert drafter.propose(context, Budget(max_depth=2, max_width=2, max_nodes=3)).num_nodes == 3
    chain = drafter.propose(context, Budget.chain(2))
    assert chain.is_chain and chain.tokens.tolist() == [6, 7]
    # Forecasts follow each node's depth, as a chain's.
    assert tree.confidence.tolist() == pytest.approx(
        [drafter.continues(2), drafter.continues(3), drafter.continues(2)]
        + [drafter.continues(3)] * 2
    )


def test_min_ngram_and_a_new_token_draft_nothing() -> None:
    assert drafted(PromptLookupDrafter(), [1, 2, 3, 4], 4) == []
    context = [1, 2, 3, 9, 3]  # [3] recurs, [9, 3] does not
    assert drafted(PromptLookupDrafter(min_ngram=2), context, 4) == []
    assert drafted(PromptLookupDrafter(min_ngram=1), context, 4) == [9, 3, 9]


def test_max_ngram_bounds_the_search() -> None:
    context = [4, 1, 2, 3, 7, 8, 0, 1, 2, 3, 9, 5, 1, 2, 3]
    # With max 2, the last two tokens [2, 3] match at both earlier places: the most recent wins.
    drafter = PromptLookupDrafter(max_ngram=2, strong_ngram=2)
    length, ends = drafter.longest_match(torch.tensor(context))
    assert length == 2 and ends.tolist() == [4, 10]


@pytest.mark.parametrize(
    "options",
    [
        {"min_ngram": 0},
        {"min_ngram": 4, "max_ngram": 3},
        {"strong_ngram": 0},
        {"strong_ngram": 4, "max_ngram": 3},
        {"weak_draft": -1},
        {"prior_weight": 0.0},
    ],
)
def test_bad_options_are_refused(options: dict) -> None:
    with pytest.raises(SpecDecodeError):
        PromptLookupDrafter(**options)


def test_the_replay_script_costs_steps_and_bounds_lookup() -> None:
    replay = load_benchmark_script("replay_prompt_lookup")
    curve = {1: 100.0, 4: 130.0, 8: 250.0}
    assert replay.cost_ms(curve, 1) == 100.0
    assert replay.cost_ms(curve, 6) == 190.0
    assert replay.cost_ms(curve, 16) == 500.0  # past the end: proportional
    passage = list(range(20, 40))
    prompt = [1, *passage, 2, passage[0]]
    output = passage[1:13]
    plain = replay.replay(prompt, output, lambda context, future: [], curve)
    assert plain == 12 * 100.0
    # The oracle copies the 11 tokens that follow, plus the bonus: one 12-token forward.
    assert replay.oracle_ms(prompt, output, curve) == replay.cost_ms(curve, 12)
    drafter = replay.drafter_policy(PromptLookupDrafter(), 16)
    # A 1-token match drafts 3 tokens, then the heuristic grows the draft: slower than the oracle.
    assert replay.cost_ms(curve, 12) < replay.replay(prompt, output, drafter, curve) < plain


def test_the_replay_splits_the_oracle_into_draft_length_and_choice_of_copy() -> None:
    replay = load_benchmark_script("replay_prompt_lookup")
    curve = {1: 100.0, 4: 130.0, 8: 250.0}
    # Token 7 occurs twice; the latest occurrence is followed by 9s, the earlier one by the text
    # that comes: only the choice among the copies finds it.
    right = list(range(20, 30))
    prompt = [7, *right, 3, 7, 9, 9, 9, 9, 5, 7]
    output = right[:8]
    drafter = PromptLookupDrafter()
    known = replay.known_length_policy(drafter, 16)
    best = replay.best_occurrence_policy(drafter, 16)
    assert known(prompt, output) == []  # its copy (9, 9, ...) fails at once
    assert best(prompt, output) == output
    # The replay drafts 7 of them, and the bonus brings the last: one 8-token forward.
    assert replay.replay(prompt, output, best, curve) == replay.cost_ms(curve, 8)
    assert replay.replay(prompt, output, best, curve) < replay.replay(prompt, output, known, curve)


def test_the_replay_counts_prefill_as_the_benchmark_does() -> None:
    replay = load_benchmark_script("replay_prompt_lookup")
    # 1 s of prefill, 9 s of plain decoding; a policy that decodes in a third of the time.
    run = replay.RecordedRun("code-editing", [1], [2], prefill_seconds=1.0, decode_seconds=9.0)
    assert run.speed_up(1 / 3, with_prefill=False) == pytest.approx(3.0)
    assert run.speed_up(1 / 3, with_prefill=True) == pytest.approx(10.0 / 4.0)
    assert run.speed_up(1.0, with_prefill=True) == pytest.approx(1.0)


def test_the_replay_oracle_bounds_the_drafter_on_random_and_periodic_text() -> None:
    replay = load_benchmark_script("replay_prompt_lookup")
    curve = {1: 150.0, 4: 195.0, 8: 290.0, 16: 440.0}
    rng = random.Random(1)
    cases = [([1, 2, 3], [5] * 6), ([0], [1, 1, 1, 0, 1, 1, 1, 0, 1, 0])]
    for _ in range(300):
        vocab = rng.choice([2, 3, 6])
        cases.append(
            (
                [rng.randrange(vocab) for _ in range(rng.randint(1, 12))],
                [rng.randrange(vocab) for _ in range(rng.randint(1, 14))],
            )
        )
    for prompt, output in cases:
        bound = replay.oracle_ms(prompt, output, curve)
        for policy in (
            replay.drafter_policy(PromptLookupDrafter(), 16),
            replay.controlled(replay.stop12_lookup, 16),
            replay.known_length_policy(PromptLookupDrafter(), 16),
            replay.best_occurrence_policy(PromptLookupDrafter(), 16),
            lambda context, future: [],
        ):
            assert bound <= replay.replay(prompt, output, policy, curve) + 1e-9, (prompt, output)


def test_drafts_are_forecast_from_the_match_length_and_the_verdicts() -> None:
    drafter = PromptLookupDrafter()
    passage = list(range(10, 40))
    context = passage + [1] + passage[:2]  # a 2-token match
    tree = drafter.propose(context, Budget.chain(3))
    # Draft i continues a copy that has matched 2 + i - 1 tokens: the prior, rising with it.
    assert tree.confidence.tolist() == pytest.approx(list(PRIOR_CONTINUES[1:4]))
    # The first draft is accepted and the second is not: the forecast for a 2-token match goes
    # up, for a 3-token match down, and nothing is learned about 4 (never tried).
    drafter.update(Verdict(path=[0], tokens=[12, 99], num_draft_nodes=3, bonus=False))
    assert drafter.continues(2) > PRIOR_CONTINUES[1]
    assert drafter.continues(3) < PRIOR_CONTINUES[2]
    assert drafter.continues(4) == pytest.approx(PRIOR_CONTINUES[3])
    # A new sequence starts from the prior again.
    drafter.begin(context, None, None)
    assert drafter.continues(3) == pytest.approx(PRIOR_CONTINUES[2])
    # Longer matches are forecast to go on more often, and a proposal with no match learns nothing.
    long = drafter.propose(passage + [1] + passage[:20], Budget.chain(4)).confidence
    assert long.min() > tree.confidence.max()
    assert drafter.propose([1, 2, 3], Budget.chain(4)).num_nodes == 0
    drafter.update(Verdict(path=[], tokens=[5], num_draft_nodes=0, bonus=False))
    assert drafter.tries == [0] * len(drafter.tries)


def test_the_forecast_follows_the_cap_the_cut_and_the_match_groups() -> None:
    drafter = PromptLookupDrafter()
    passage = list(range(100, 180))
    weak = drafter.propose(passage + [1] + passage[:1], Budget.chain(8))  # a 1-token match
    assert len(weak) == len(weak.confidence) == drafter.weak_draft
    # Cut to 2 drafts by a controller, both accepted: two tries learned, for matches of 1 and 2.
    drafter.update(Verdict(path=[0, 1], tokens=[101, 102, 103], num_draft_nodes=2, bonus=True))
    assert sum(drafter.tries) == 2 and sum(drafter.hits) == 2
    # Matches of 31 and 32 tokens fall in different groups; 32 and 64 in the same.
    assert _group(31) != _group(32) == _group(64) == len(drafter.tries) - 1
    # A periodic copy (period 3) is forecast like any other copy of its match length.
    periodic = drafter.propose([7, 8, 1, 2, 3, 1, 2, 3, 1, 2], Budget.chain(7))
    assert periodic.confidence.tolist() == pytest.approx(
        [drafter.continues(5 + depth) for depth in range(7)]
    )
