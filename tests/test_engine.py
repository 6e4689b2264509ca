"""Engine behaviour on the toy model: exactness, stopping, statistics and bookkeeping."""

from __future__ import annotations

import pytest
import torch
from toy import ToyBackend, ToyTokenizer, plain_greedy

from specdecode.config import SamplingParams, SpecConfig
from specdecode.engine import Engine
from specdecode.errors import SpecDecodeError
from specdecode.tree import DraftTree

REPETITIVE_PROMPT = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3]


@pytest.mark.parametrize("drafter", ["none", "prompt-lookup", "draft-model"])
@pytest.mark.parametrize("controller", ["fixed", "heuristic", "cost-aware"])
def test_greedy_matches_plain_decoding(drafter: str, controller: str) -> None:
    target = ToyBackend(seed=1)
    # A draft model that agrees with the target often but not always.
    draft = ToyBackend(seed=1, order=2)
    engine = Engine(target, ToyTokenizer(), draft_model=draft)
    sampling = SamplingParams(max_new_tokens=40)
    spec = SpecConfig(drafter=drafter, controller=controller, num_draft_tokens=3)
    ids, text, stats = engine.generate(REPETITIVE_PROMPT, sampling, spec)
    assert ids == plain_greedy(ToyBackend(seed=1), REPETITIVE_PROMPT, 40)
    assert text == ToyTokenizer().decode(ids)
    assert stats.new_tokens == 40 and stats.stop_reason == "length"
    assert stats.emitted_tokens >= stats.new_tokens
    if drafter == "none":
        assert stats.target_forwards == 40 and stats.mean_accepted_tokens == 1.0
    elif controller != "cost-aware":
        # Drafts were accepted: the identity above is not plain decoding's by default. (What the
        # cost-aware controller drafts depends on the times it measures, and the toy's forwards
        # take microseconds, less than drafting: it may rightly draft nothing here.
        # test_drafts_cut_by_their_forecasts_keep_the_output_exact runs it on a cost curve.)
        assert stats.target_forwards < 40


class _KeepsTheWrongPath(ToyBackend):
    """Broken: a commit truncates after as many nodes as were accepted instead of moving the
    accepted path's entries into place (right for a chain, wrong for a tree's other branches)."""

    def keep(self, start: int, offsets) -> None:
        self.truncate(start + len(offsets))


def test_a_commit_that_keeps_the_wrong_nodes_breaks_the_identity() -> None:
    """Negative control of the greedy identity tests: a cache bookkeeping bug in a tree's commit
    changes the output, so those tests can fail."""
    engine = Engine(
        _KeepsTheWrongPath(seed=1, vocab_size=6),
        ToyTokenizer(),
        draft_model=ToyBackend(seed=1, order=2, vocab_size=6),
    )
    spec = SpecConfig(
        drafter="draft-model", controller="fixed", num_draft_tokens=3, tree="static", tree_width=2
    )
    ids, _, _ = engine.generate([0, 1, 2], SamplingParams(max_new_tokens=40), spec)
    assert ids != plain_greedy(ToyBackend(seed=1, vocab_size=6), [0, 1, 2], 40)


def test_draft_model_that_agrees_is_fully_accepted() -> None:
    target = ToyBackend(seed=5)
    engine = Engine(target, ToyTokenizer(), draft_model=ToyBackend(seed=5))
    spec = SpecConfig(drafter="draft-model", controller="fixed", num_draft_tokens=4)
    ids, _, stats = engine.generate([0, 1], SamplingParams(max_new_tokens=25), spec)
    assert ids == plain_greedy(ToyBackend(seed=5), [0, 1], 25)
    assert stats.target_forwards == 5  # 5 tokens per forward: 4 drafts and a bonus
    assert stats.acceptance_histogram == [0, 0, 0, 0, 5]
    assert stats.acceptance_rate_by_depth == [1.0] * 4


def test_eos_stops_and_is_not_emitted() -> None:
    target = ToyBackend(seed=2)
    reference = plain_greedy(ToyBackend(seed=2), [3], 30)
    eos = reference[7]
    first = reference.index(eos)
    engine = Engine(target, ToyTokenizer(eos=eos))
    ids, _, stats = engine.generate(
        [3], SamplingParams(max_new_tokens=30), SpecConfig(controller="heuristic")
    )
    assert ids == reference[:first]
    assert stats.stop_reason == "eos"


def test_stop_string_cuts_text() -> None:
    reference = plain_greedy(ToyBackend(seed=3), [0], 30)
    text = ToyTokenizer().decode(reference)
    stop = text[10:12]
    cut = text.find(stop)
    engine = Engine(ToyBackend(seed=3), ToyTokenizer())
    sampling = SamplingParams(max_new_tokens=30, stop=(stop,))
    _, out, stats = engine.generate([0], sampling, SpecConfig(controller="heuristic"))
    assert out == text[:cut]
    assert stats.stop_reason == "stop"


def test_streaming_concatenates_to_the_whole() -> None:
    engine = Engine(ToyBackend(seed=4), ToyTokenizer())
    sampling = SamplingParams(max_new_tokens=20)
    steps = list(engine.stream(REPETITIVE_PROMPT, sampling, SpecConfig(controller="heuristic")))
    assert steps[-1].finished
    ids = [t for s in steps for t in s.token_ids]
    assert ids == plain_greedy(ToyBackend(seed=4), REPETITIVE_PROMPT, 20)
    assert "".join(s.text for s in steps) == ToyTokenizer().decode(ids)


def test_prompt_lookup_accepts_on_repetitive_text() -> None:
    target = ToyBackend(seed=0, order=1)  # order 1: the continuation repeats with the prompt
    engine = Engine(target, ToyTokenizer())
    prompt = plain_greedy(ToyBackend(seed=0, order=1), [0], 30)
    spec = SpecConfig(drafter="prompt-lookup", controller="fixed", num_draft_tokens=5)
    _, _, stats = engine.generate(prompt, SamplingParams(max_new_tokens=30), spec)
    assert stats.mean_accepted_tokens > 3.0


def test_draft_never_runs_past_the_token_limit() -> None:
    target = ToyBackend(seed=5)
    engine = Engine(target, ToyTokenizer(), draft_model=ToyBackend(seed=5))
    spec = SpecConfig(drafter="draft-model", controller="fixed", num_draft_tokens=8)
    engine.generate([0], SamplingParams(max_new_tokens=3), spec)
    # prefill feeds nothing for a one-token prompt; the one step drafts at most 2 tokens.
    assert target.forward_sizes == [3]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": -3},
        {"temperature": -0.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
    ],
)
def test_bad_sampling_params_are_refused(kwargs: dict) -> None:
    with pytest.raises(SpecDecodeError):
        SamplingParams(**kwargs)


def test_bad_requests_are_refused() -> None:
    engine = Engine(ToyBackend(max_context=16), ToyTokenizer())
    with pytest.raises(SpecDecodeError, match="empty"):
        engine.generate([], SamplingParams(), SpecConfig())
    with pytest.raises(SpecDecodeError, match="context"):
        engine.generate(list(range(8)) * 3, SamplingParams(), SpecConfig())
    with pytest.raises(SpecDecodeError, match="unknown drafter"):
        engine.generate([1], SamplingParams(), SpecConfig(drafter="nope"))
    with pytest.raises(SpecDecodeError, match="needs a draft model"):
        engine.generate([1], SamplingParams(), SpecConfig(drafter="draft-model"))
    with pytest.raises(SpecDecodeError, match="draft length"):
        SpecConfig(num_draft_tokens=0)


def test_generation_stops_at_the_context_limit() -> None:
    engine = Engine(ToyBackend(max_context=20), ToyTokenizer())
    ids, _, stats = engine.generate(
        REPETITIVE_PROMPT,
        SamplingParams(max_new_tokens=50, ignore_eos=True),
        SpecConfig(controller="heuristic"),
    )
    assert len(REPETITIVE_PROMPT) + len(ids) == 20
    assert stats.stop_reason == "context"


def test_tree_validation() -> None:
    with pytest.raises(SpecDecodeError, match="parent"):
        DraftTree(torch.tensor([1, 2]), torch.tensor([1, -1]))
    with pytest.raises(SpecDecodeError, match="parent"):
        DraftTree(torch.tensor([1]), torch.tensor([0]))
    tree = DraftTree(torch.tensor([5, 6, 7, 8]), torch.tensor([-1, -1, 0, 2]))
    assert tree.depths.tolist() == [1, 1, 2, 3]
    assert tree.path_to(3) == [0, 2, 3]
    assert not tree.is_chain
    assert tree.attention_mask[4].tolist() == [True, True, False, True, True]


@pytest.mark.parametrize("drafter", ["prompt-lookup", "draft-model"])
def test_steps_that_draft_nothing_keep_the_output_exact(
    drafter: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A controller may ask for no drafts (cost-aware does, where drafting cannot pay): the draft
    model's cache must catch up afterwards and the output stay the target's own."""
    from specdecode import control
    from specdecode.control.base import Controller
    from specdecode.tree import Budget

    class Scripted(Controller):
        name = "scripted"
        lengths = [0, 3, 0, 0, 5, 1, 0, 2]

        def __init__(self, initial: int, maximum: int) -> None:
            self.step = 0

        def budget(self) -> Budget:
            return Budget.chain(self.lengths[self.step % len(self.lengths)])

        def observe(self, verdict, timings=None) -> None:
            self.step += 1

    monkeypatch.setitem(control.CONTROLLERS, "scripted", Scripted)
    target = ToyBackend(seed=1)
    engine = Engine(target, ToyTokenizer(), draft_model=ToyBackend(seed=1, order=2))
    spec = SpecConfig(drafter=drafter, controller="scripted", num_draft_tokens=3)
    ids, _, stats = engine.generate(REPETITIVE_PROMPT, SamplingParams(max_new_tokens=40), spec)
    assert ids == plain_greedy(ToyBackend(seed=1), REPETITIVE_PROMPT, 40)
    assert stats.emitted_tokens > stats.target_forwards  # some drafts were accepted


def test_drafts_cut_by_their_forecasts_keep_the_output_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cost-aware controller cuts prompt lookup's drafts where their forecast stops paying; the
    toy's forwards take microseconds whatever their length, so its steps are timed as if
    verification followed a curve on which only likely drafts pay."""
    from specdecode.control import StepTimings
    from specdecode.control.cost_aware import CostAwareController

    curve = {0: 0.1, 1: 0.13, 8: 0.17, 16: 0.5}
    cuts: list[tuple[int, int]] = []
    shorten, observe = CostAwareController.shorten, CostAwareController.observe

    def recorded_shorten(self, tree):
        cut = shorten(self, tree)
        cuts.append((tree.num_nodes, cut.num_nodes))
        return cut

    def curve_timed_observe(self, verdict, timings=None):
        verifying = self._verify_cost(verdict.num_draft_nodes) if timings else None
        observe(self, verdict, timings and StepTimings(timings.drafting, verifying))

    monkeypatch.setattr(CostAwareController, "shorten", recorded_shorten)
    monkeypatch.setattr(CostAwareController, "observe", curve_timed_observe)
    engine = Engine(ToyBackend(seed=1), ToyTokenizer())
    monkeypatch.setattr(engine, "forward_costs", lambda: curve)
    spec = SpecConfig(drafter="prompt-lookup", controller="cost-aware")
    prompt = REPETITIVE_PROMPT * 3 + plain_greedy(ToyBackend(seed=1), REPETITIVE_PROMPT, 30)
    ids, _, _ = engine.generate(prompt, SamplingParams(max_new_tokens=60), spec)
    assert ids == plain_greedy(ToyBackend(seed=1), prompt, 60)
    assert any(0 < kept < drafted for drafted, kept in cuts)  # cut short
    assert any(kept == 0 < drafted for drafted, kept in cuts)  # cut to plain decoding
    assert any(kept > 4 for _, kept in cuts)  # a long draft was verified
