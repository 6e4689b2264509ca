"""Self-speculation: the target drafts with part of its own layers (`layer-skip`, `clasp`,
`early-exit`).

- Partial forwards: the empty plan gives the full forward's bits; a plan that skips every
  sublayer is the output layer on the embeddings; an exit layer equals skipping every layer
  above it; a plan out of range, and a backend that cannot skip layers, are one clear error.
- The cache: drafting and scoring leave the committed rows' keys and values as they were, and a
  drafter that wrote over them (re-feeding committed tokens through the plan) would change the
  output: the negative control of the identity tests.
- The search: candidates keep their size and the first and last layers; only a better score
  replaces the best set; the set lasts across requests; saved sets load, and one of another
  model is refused. On a model some of whose layers do nothing, SWIFT's search and CLaSp's
  dynamic programme both find them.
- Greedy output equals plain decoding's with drafts accepted, on a tiny model (chains and trees)
  and on a real one; `certify` passes at temperature 1 (slow).
"""

from __future__ import annotations

import json

import pytest
import torch
from certified import assert_certify_passes
from tiny_models import decode_greedily, tiny_torch_backend
from toy import ToyBackend, ToyTokenizer

from specdecode import SamplingParams, SpecConfig, SpecDecoder
from specdecode.backends.base import LayerPlan
from specdecode.drafters import DrafterResources, make_drafter
from specdecode.drafters.clasp import ClaspDrafter
from specdecode.drafters.early_exit import EarlyExitDrafter
from specdecode.drafters.layer_search import (
    PlanScorer,
    SkipSearch,
    load_plan,
    plan_of,
    save_plan,
)
from specdecode.drafters.layer_skip import LayerSkipDrafter
from specdecode.drafters.partial_target import ConfidenceStop
from specdecode.engine import Engine
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget
from specdecode.verify.base import Verdict

PROMPT = [3, 9, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]


def tiny(layers: int = 6):
    # Small layer weights: the next token depends mostly on the last, so a model with some
    # layers left out still agrees with the whole one often (drafts get accepted).
    return tiny_torch_backend(num_layers=layers, vocab_size=32, seed=5, layer_std=0.1)


def test_the_empty_plan_is_the_full_forward() -> None:
    model = tiny()
    ids = torch.tensor(PROMPT)
    full = model.forward(ids)
    model.truncate(0)
    assert torch.equal(model.forward_partial(ids, LayerPlan()), full)


def test_skipping_every_sublayer_leaves_the_output_layer_on_the_embeddings() -> None:
    model = tiny(3)
    layers = frozenset(range(3))
    logits = model.forward_partial(torch.tensor(PROMPT[:4]), LayerPlan(layers, layers))
    weights = model.model
    hidden = model.final_norm(weights.embed.weight[torch.tensor(PROMPT[:4])])
    assert torch.allclose(logits, hidden @ weights.lm_head.weight.T, atol=1e-5)
    assert not torch.allclose(logits, model.forward(torch.tensor(PROMPT[:4])), atol=1e-3)


def test_an_exit_layer_equals_skipping_every_layer_above_it() -> None:
    model = tiny()
    ids = torch.tensor(PROMPT)
    exited = model.forward_partial(ids, LayerPlan(exit_layer=2))
    model.truncate(0)
    above = frozenset(range(2, 6))
    assert torch.equal(model.forward_partial(ids, LayerPlan(above, above)), exited)


@pytest.mark.parametrize(
    "plan",
    [
        LayerPlan(skip_attention=frozenset({6})),
        LayerPlan(skip_mlp=frozenset({-1})),
        LayerPlan(exit_layer=0),
    ],
)
def test_a_plan_out_of_range_is_refused(plan: LayerPlan) -> None:
    with pytest.raises(SpecDecodeError, match="the model has 6 layers"):
        tiny().forward_partial(torch.tensor(PROMPT), plan)


@pytest.mark.parametrize("drafter", ["layer-skip", "clasp", "early-exit", "kangaroo"])
def test_a_backend_that_runs_its_model_whole_is_refused(drafter: str) -> None:
    with pytest.raises(SpecDecodeError, match="use --backend torch"):
        make_drafter(drafter, {}, DrafterResources(target=ToyBackend(seed=0)))


def test_drafting_and_scoring_leave_the_committed_cache_rows_alone() -> None:
    model = tiny()
    model.prefill(PROMPT)
    committed = model.num_cached
    keys, values = model.cache.k[:, :, :committed].clone(), model.cache.v[:, :, :committed].clone()
    drafter = LayerSkipDrafter(model, skip_ratio=0.5, window=4, min_confidence=0.0)
    drafter.begin(PROMPT, SamplingParams(), None)
    assert drafter.propose(PROMPT, Budget.chain(5)).num_nodes == 5
    scorer = PlanScorer(model, PROMPT, 10, 8)
    assert scorer.score(LayerPlan()) == pytest.approx(1.0, abs=0.01)  # the full model agrees
    scorer.score(plan_of([2, 3, 5]))
    assert model.num_cached == committed
    assert torch.equal(model.cache.k[:, :, :committed], keys)
    assert torch.equal(model.cache.v[:, :, :committed], values)


class _OverwritesCommittedRows(LayerSkipDrafter):
    """Broken: drafts after re-feeding the last committed tokens through the plan, which writes
    the partial model's keys and values over the full model's in the kept layers."""

    def propose(self, context, budget):
        committed = self.target.num_cached
        self.target.truncate(committed - 4)
        plan = self.plan(context)
        self.target.forward_partial(torch.tensor(list(context[committed - 4 : committed])), plan)
        return super().propose(context, budget)


def _generate(engine: Engine, prompt, drafter: str = "none", **spec) -> tuple[list[int], float]:
    sampling = SamplingParams(max_new_tokens=40)
    ids, _, stats = engine.generate(prompt, sampling, SpecConfig(drafter=drafter, **spec))
    return ids, stats.mean_accepted_tokens


def with_idle_layers(attention: set[int], mlp: set[int]):
    """`tiny()` whose listed sublayers add nothing to the residual stream (their output
    projections zeroed), so a draft that skips exactly those is the full model. (The layers
    weigh more than `tiny`'s: every other sublayer changes what the model predicts.)"""
    model = tiny_torch_backend(num_layers=6, vocab_size=32, seed=5, layer_std=1.0)
    for layer in attention:
        model.model.blocks[layer].o.weight.data.zero_()
    for layer in mlp:
        model.model.blocks[layer].down.weight.data.zero_()
    return model


def test_the_search_finds_the_sublayers_that_do_nothing() -> None:
    model = with_idle_layers({1, 4}, {2})
    model.prefill(PROMPT)
    scorer = PlanScorer(model, PROMPT, 2, 16)
    search = SkipSearch(num_layers=6, count=3, seed=0)
    for _ in range(60):
        candidate = search.candidate()
        search.report(candidate, scorer.score(plan_of(candidate)))
    assert search.best == [2, 5, 8]  # attention of 1 and 4, MLP of 2
    assert search.best_score >= 1.0  # its argmax is the full model's everywhere


def test_clasp_finds_the_layers_that_do_nothing() -> None:
    model = with_idle_layers({2, 3}, {2, 3})
    drafter = ClaspDrafter(model, skip_ratio=0.5)  # 2 of the 4 middle layers
    model.capture_hidden(drafter.hidden_layers)
    model.prefill(PROMPT)
    assert drafter.skipped == {1, 3}  # the starting point
    found = drafter.search(model.prompt_hidden[-1], model.num_cached - 1)
    assert found == {2, 3}


@pytest.mark.parametrize(
    ("drafter", "options"),
    [
        ("clasp", {"replan_every": 1}),
        ("layer-skip", {"window": 6}),
        ("layer-skip", {"skip_ratio": 0.25, "window": 6, "adapt_confidence": True}),
        ("early-exit", {"exit_layer": 3}),
    ],
)
@pytest.mark.parametrize("tree", ["chain", "static"])
def test_greedy_output_is_plain_decodings_on_a_tiny_model(drafter, options, tree) -> None:
    engine = Engine(tiny(), ToyTokenizer())
    plain, _ = _generate(engine, PROMPT)
    spec = {"drafter_options": options, "controller": "heuristic", "tree": tree}
    if tree != "chain":
        spec |= {"tree_width": 2, "tree_nodes": 8}
    fast, accepted = _generate(engine, PROMPT, drafter, **spec)
    assert fast == plain
    assert accepted > 1.5  # drafts were accepted: the identity is not plain decoding's


def test_a_drafter_that_overwrites_committed_rows_changes_the_output() -> None:
    """Negative control of the identity tests above: they catch a draft's trace in the cache.
    (On a model whose layers weigh more than `tiny`'s, where the keys matter more.)"""
    engine = Engine(tiny_torch_backend(4, 32, seed=5, layer_std=1.0), ToyTokenizer())
    plain, _ = _generate(engine, PROMPT)
    sound = LayerSkipDrafter(engine.target, skip_ratio=0.5, window=6, min_confidence=0)
    assert decode_greedily(engine.target, sound, PROMPT, 40) == plain
    broken = _OverwritesCommittedRows(engine.target, skip_ratio=0.5, window=6, min_confidence=0)
    assert decode_greedily(engine.target, broken, PROMPT, 40) != plain


def test_the_search_keeps_its_size_and_the_outer_layers_and_only_a_better_set() -> None:
    search = SkipSearch(num_layers=8, count=5, seed=1)
    first = search.candidate()
    assert first == search.best and len(first) == 5
    search.report(first, 0.5)
    for _ in range(30):
        candidate = search.candidate()
        assert len(set(candidate)) == 5
        assert all(2 <= s < 14 for s in candidate)  # never layer 0's or layer 7's sublayers
        before = list(search.best)
        better = search.report(candidate, 0.4)
        assert not better and search.best == before
    candidate = search.candidate()
    assert search.report(candidate, 0.6) and search.best == candidate


def test_the_search_lasts_across_requests() -> None:
    model = tiny()
    shared: dict = {}
    first = LayerSkipDrafter(model, window=4, shared=shared)
    second = LayerSkipDrafter(model, window=4, shared=shared)
    assert first.search is second.search
    assert LayerSkipDrafter.keeps_model_statistics


def test_a_saved_set_loads_and_one_of_another_model_is_refused(tmp_path) -> None:
    path = tmp_path / "skip.json"
    plan = plan_of([2, 5, 9])
    save_plan(path, plan, {"num_layers": 6, "model": "tiny"})
    assert load_plan(path, 6) == plan
    drafter = LayerSkipDrafter(tiny(), skip_file=str(path))
    assert drafter.plan(PROMPT) == plan
    with pytest.raises(SpecDecodeError, match="tuned for a model of 6 layers"):
        load_plan(path, 8)
    (tmp_path / "bad.json").write_text(json.dumps({"skip": []}))
    with pytest.raises(SpecDecodeError, match="not a skip set"):
        load_plan(tmp_path / "bad.json", 6)
    with pytest.raises(SpecDecodeError, match="cannot read"):
        load_plan(tmp_path / "missing.json", 6)


def test_the_adaptive_threshold_rises_while_drafts_are_rejected_and_falls_after() -> None:
    stop = ConfidenceStop(0.6, adapt=True, drafter="layer-skip")
    for _ in range(20):
        stop.observe(Verdict([], [1], 4, False), reached_full_depth=False)
    risen = stop.threshold
    assert risen > 0.6
    for _ in range(20):
        stop.observe(Verdict([0, 1, 2], [1, 2, 3, 4], 3, True), reached_full_depth=False)
    assert stop.threshold < risen
    fixed = ConfidenceStop(0.6, adapt=False, drafter="layer-skip")
    fixed.observe(Verdict([], [1], 4, False), reached_full_depth=False)
    assert fixed.threshold == 0.6


def test_early_exit_defaults_to_three_quarters_of_the_layers() -> None:
    assert EarlyExitDrafter(tiny(8)).plan(PROMPT) == LayerPlan(exit_layer=6)


@pytest.fixture(scope="module")
def llm() -> SpecDecoder:
    return SpecDecoder.load("smollm2-135m-instruct")


CODE = "Write a Python function that returns the n-th Fibonacci number, with a docstring."


@pytest.mark.parametrize(
    ("drafter", "options", "least"),
    [
        ("layer-skip", {"window": 8, "skip_ratio": 0.2}, 1.2),
        ("clasp", {}, 1.2),
        # Even two layers short of the top, this model's exit is seldom right (6 of 41).
        ("early-exit", {"exit_layer": 28, "min_confidence": 0.0}, 1.05),
    ],
)
def test_greedy_output_is_plain_decodings_on_a_real_model(
    llm: SpecDecoder, drafter: str, options: dict, least: float
) -> None:
    llm.engine.drafter_state.clear()
    sampling = SamplingParams(max_new_tokens=48)
    plain = llm.generate(CODE, sampling, SpecConfig(drafter="none"))
    spec = SpecConfig(drafter=drafter, controller="heuristic", drafter_options=options)
    fast = llm.generate(CODE, sampling, spec)
    assert fast.token_ids == plain.token_ids
    assert fast.stats.mean_accepted_tokens > least  # drafts were accepted


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["layer-skip", "clasp", "early-exit"])
def test_sampling_passes_certify(llm: SpecDecoder, drafter: str) -> None:
    assert_certify_passes(llm, SpecConfig(drafter=drafter, controller="fixed", num_draft_tokens=3))
