"""The cost-aware controller picks the draft length from measured costs and acceptance."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from specdecode.control import StepTimings, make_controller
from specdecode.control.cost_aware import CostAwareController
from specdecode.errors import SpecDecodeError
from specdecode.tree import DraftTree
from specdecode.verify.base import Verdict


def verdict(drafted: int, accepted: int) -> Verdict:
    return Verdict(
        path=list(range(accepted)),
        tokens=[1] * (accepted + 1),
        num_draft_nodes=drafted,
        bonus=accepted == drafted,
    )


def run(controller: CostAwareController, verify_cost, accept, steps: int = 200) -> list[int]:
    """Simulate steps: drafts of the controller's length, accepted while `accept(depth)`."""
    lengths = []
    for _ in range(steps):
        length = controller.budget().max_depth
        lengths.append(length)
        accepted = 0
        while accepted < length and accept(accepted):
            accepted += 1
        controller.observe(verdict(length, accepted), StepTimings(0.0, verify_cost(length)))
    return lengths


def test_cheap_verification_and_good_drafts_draft_long() -> None:
    controller = CostAwareController(initial=4, maximum=16)
    lengths = run(controller, lambda k: 0.20 + 0.01 * k, lambda depth: depth < 12)
    assert lengths[-1] == 12  # the whole run of acceptable drafts, nothing beyond it


def test_expensive_verification_turns_drafting_off_but_keeps_probing() -> None:
    controller = CostAwareController(initial=4, maximum=16, probe_every=8)
    # Each draft token costs more than a forward's worth and only the first is ever accepted.
    lengths = run(controller, lambda k: 0.2 + 0.25 * k, lambda depth: depth == 0)
    tail = lengths[-64:]
    assert tail.count(0) >= 50  # plain decoding most of the time
    assert 1 in tail  # with a short probe now and then
    assert max(tail) <= 1


def test_acceptance_is_learned_per_position() -> None:
    controller = CostAwareController(initial=8, maximum=8, smoothing=1.0)
    controller.observe(verdict(8, 3), StepTimings(0.0, 0.3))
    # Positions 1-3 accepted, position 4 rejected, 5-8 not tried (kept at the last estimate).
    assert controller.acceptance == [1.0, 1.0, 1.0, 0.0]
    assert controller.expected_tokens(8) == pytest.approx(4.0)


def test_a_slow_drafter_is_not_worth_its_drafts() -> None:
    controller = CostAwareController(initial=4, maximum=16)
    lengths = []
    for _ in range(100):
        length = controller.budget().max_depth
        lengths.append(length)
        # Two drafts are always accepted, but each costs 0.3 s against a 0.2 s target step:
        # 3 tokens in 0.8 s lose to plain decoding's 1 token in 0.2 s.
        timings = StepTimings(drafting=0.3 * length, verifying=0.2)
        controller.observe(verdict(length, min(length, 2)), timings)
    assert lengths[-32:].count(0) >= 24


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(SpecDecodeError, match="smoothing"):
        make_controller("cost-aware", 4, 16, {"smoothing": 0.0})
    with pytest.raises(SpecDecodeError, match="bad options"):
        make_controller("cost-aware", 4, 16, {"no_such_option": 1})


def test_the_draft_models_catch_up_is_not_counted_as_drafting_cost() -> None:
    controller = CostAwareController(initial=4, maximum=8)
    # The first draft of a sequence also prefills the draft model: 3 s, then 0.01 s per token.
    for step in range(20):
        length = controller.budget().max_depth
        seconds = 3.0 if step == 0 else 0.01 * length
        controller.observe(verdict(length, length), StepTimings(seconds, 0.2 + 0.01 * length))
    assert controller.draft_seconds_per_token == pytest.approx(0.01)
    assert controller.budget().max_depth == 8


def test_a_measured_cost_curve_settles_on_the_best_length_at_once() -> None:
    steep = {0: 0.04, 1: 0.07, 2: 0.09, 3: 0.11, 4: 0.13, 6: 0.2, 8: 0.24, 12: 0.3, 16: 0.3}

    def cost(k: int) -> float:
        return steep[max(m for m in steep if m <= k)]

    informed = make_controller("cost-aware", 4, 16, {})
    assert informed.uses_costs
    informed.use_costs(steep)
    assert informed.expected_seconds(8) == pytest.approx(0.24)
    assert informed.expected_seconds(10) == pytest.approx(0.27)  # between 8 and 12, linearly
    assert informed.expected_seconds(40) == pytest.approx(0.3)  # past the curve: optimistic
    # Only the first draft is ever accepted: drafting 1 pays (2 tokens for 0.07 s against 1 for
    # 0.04 s) and drafting more does not.
    lengths = run(informed, cost, lambda depth: depth == 0, steps=40)
    assert lengths[3:] == [1] * 37
    # Learning costs online only, it first tries lengths that do not pay (the longest, costed at
    # the price of the one length it has seen).
    uninformed = CostAwareController(initial=4, maximum=16)
    blind = run(uninformed, cost, lambda depth: depth == 0, steps=40)
    assert max(blind[1:]) > 8
    assert sum(map(cost, lengths)) < sum(map(cost, blind))


def test_online_timings_are_not_overwritten_by_the_curve() -> None:
    controller = CostAwareController(initial=4, maximum=8)
    controller.observe(verdict(4, 4), StepTimings(0.0, 0.5))
    controller.use_costs({4: 0.1, 8: 0.2})
    assert controller.verify_seconds[4] == pytest.approx(0.5)
    assert controller.verify_seconds[8] == pytest.approx(0.2)


def test_failed_probes_come_ever_more_rarely_and_successful_ones_as_often_as_set() -> None:
    def probes_and_waits(lengths: list[int]) -> tuple[list[int], list[int]]:
        probes = [step for step, length in enumerate(lengths) if length > 0]
        return probes, [later - earlier - 1 for earlier, later in pairwise(probes)]

    controller = CostAwareController(initial=1, maximum=4, probe_every=8)
    # A draft costs a whole forward's worth more and is never accepted: drafting never pays, and
    # the plain steps between probes double after each failure, up to the cap.
    _, waits = probes_and_waits(run(controller, lambda k: 0.2 + 0.2 * k, lambda d: False, 300))
    assert waits[-6:] == [7, 15, 31, 63, 63, 63]
    # Probes that succeed (but do not make drafting pay) come every probe_every steps again.
    _, waits = probes_and_waits(run(controller, lambda k: 0.2 + 0.25 * k, lambda d: True, 65))
    assert waits and set(waits[1:]) == {7}
    probes, waits = probes_and_waits(run(controller, lambda k: 0.2 + 0.2 * k, lambda d: False, 40))
    assert probes[0] <= 8 and waits[0] == 15


#: Seconds of a forward verifying k drafts: flat to 3, then 0.01 s per draft.
FLAT_THEN_STEEP = {0: 0.1, 3: 0.1, 16: 0.23}


def forecast(confidence: list[float]) -> DraftTree:
    return DraftTree.chain(list(range(len(confidence))), confidence=torch.tensor(confidence))


def test_a_forecast_draft_is_cut_where_more_tokens_stop_paying() -> None:
    controller = CostAwareController(initial=4, maximum=16)
    controller.use_costs(FLAT_THEN_STEEP)
    # Certain drafts pay all the way; the flat part of the curve is free.
    assert len(controller.shorten(forecast([1.0] * 16))) == 16
    # Three likely drafts, then unlikely ones: a fourth costs 0.01 s for a 1% chance of a token.
    assert len(controller.shorten(forecast([0.9] * 3 + [0.01] * 13))) == 3
    # Unlikely drafts where verification is dear: no draft at all (plain decoding), unless the
    # controller may not decode plainly.
    dear = CostAwareController(initial=4, maximum=16)
    dear.use_costs({0: 0.1, 1: 0.2, 16: 1.7})
    assert len(dear.shorten(forecast([0.3] * 16))) == 0
    strict = CostAwareController(initial=4, maximum=16, allow_plain=False)
    strict.use_costs({0: 0.1, 1: 0.2, 16: 1.7})
    assert len(strict.shorten(forecast([0.3] * 16))) == 1


def test_drafts_without_a_forecast_are_left_whole() -> None:
    controller = CostAwareController(initial=4, maximum=16)
    controller.use_costs(FLAT_THEN_STEEP)
    tree = DraftTree.chain([5, 6, 7])
    assert controller.shorten(tree) is tree
    assert not controller.forecasts


def test_free_forecast_drafts_are_asked_for_in_full_and_dear_ones_are_not() -> None:
    def steps(drafting_seconds: float) -> list[int]:
        controller = CostAwareController(initial=4, maximum=16)
        controller.use_costs(FLAT_THEN_STEEP)
        asked = []
        for _ in range(10):
            budget = controller.budget().max_depth
            asked.append(budget)
            tree = controller.shorten(forecast([0.9] * 3 + [0.01] * (budget - 3)))
            timings = StepTimings(drafting_seconds, controller.expected_seconds(len(tree)))
            controller.observe(verdict(len(tree), len(tree)), timings)
        return asked

    # Drafting in a millisecond against a 0.1 s forward: the whole maximum, cut afterwards.
    assert steps(0.001)[-5:] == [16] * 5
    # Drafting that costs a fifth of a forward: the controller's own length, as before.
    assert 16 not in steps(0.02)[2:]


def test_a_cut_is_never_made_without_costs_nor_in_trees_or_sampled_drafts() -> None:
    blind = CostAwareController(initial=4, maximum=16)  # nothing measured yet
    tree = forecast([0.01] * 4)
    assert blind.shorten(tree) is tree
    controller = CostAwareController(initial=4, maximum=16)
    controller.use_costs({0: 0.1, 1: 0.2, 16: 1.7})
    no_chance = torch.tensor([0.0, 0.0])
    branching = DraftTree(torch.tensor([1, 2]), torch.tensor([-1, -1]), None, no_chance)
    assert controller.shorten(branching) is branching
    sampled = DraftTree.chain([1, 2], torch.full((2, 4), 0.25), no_chance)
    assert controller.shorten(sampled) is sampled
    assert len(controller.shorten(forecast([0.0, 0.0]))) == 0
    assert controller.shorten(DraftTree.empty()).num_nodes == 0
    # Below the shortest measured length, a length costs what that one does.
    sparse = CostAwareController(initial=4, maximum=16)
    sparse.use_costs({4: 0.2, 8: 0.3})
    assert sparse.expected_seconds(2) == pytest.approx(0.2)


def test_drafting_cost_is_counted_over_the_draft_before_its_cut() -> None:
    controller = CostAwareController(initial=4, maximum=16)
    controller.use_costs({0: 0.1, 1: 0.2, 16: 1.7})
    for _ in range(2):
        controller.budget()
        tree = controller.shorten(forecast([0.01] * 16))  # cut to nothing
        assert len(tree) == 0
        controller.observe(verdict(0, 0), StepTimings(0.0016, 0.1))
    # 1.6 ms drafted 16 tokens (0.1 ms each), though none was verified; it was drafting all the
    # same, so the next step's drafting is not a catch-up.
    assert controller.draft_seconds_per_token == pytest.approx(0.0001)
    assert controller.draft_seconds_per_step == pytest.approx(0.0016)
    assert controller.drafted_last


def test_forecast_sized_steps_leave_the_probes_and_position_model_alone() -> None:
    controller = CostAwareController(initial=4, maximum=16, probe_every=2)
    controller.use_costs(FLAT_THEN_STEEP)
    for _ in range(3):  # two steps to learn that drafting is free, then forecast-sized ones
        tree = controller.shorten(forecast([0.01] * controller.budget().max_depth))
        controller.observe(verdict(len(tree), 0), StepTimings(0.001, 0.1))
    assert controller.asked_maximum
    before = (list(controller.acceptance), controller.probe_wait, controller.plain_steps)
    for _ in range(10):
        assert controller.budget().max_depth == 16
        tree = controller.shorten(forecast([0.9] * 3 + [0.01] * 13))
        controller.observe(verdict(len(tree), 0), StepTimings(0.001, 0.1))
    assert (controller.acceptance, controller.probe_wait, controller.plain_steps) == before
