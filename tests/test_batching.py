"""Continuous batching below the server: several `Decoding`s stepped together, their trees verified
in one forward (`Backend.forward_trees`), with draft lengths that change from step to step as the
goodput planner's would. Greedy output equals `generate`'s on a real model; sampled output keeps
the target's distribution (and a batch that hands a sequence another's logits is caught); the
planner turns drafting off where forwards are compute-bound."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from significance import ALPHA, BROKEN
from tiny_models import tiny_torch_backend

from specdecode import SpecDecoder
from specdecode.certify import homogeneity_test
from specdecode.config import SamplingParams, SpecConfig
from specdecode.control.goodput import Outlook, interpolated, plan_draft_lengths
from specdecode.engine import Engine

# Draft-length caps by step, as a planner under changing load might give them (None: no cap).
CAPS = (None, 0, 3, 1, None, 2, 0, 5)


def run_batched(
    engine: Engine,
    prompts: list[list[int]],
    sampling: Callable[[int], SamplingParams],
    spec: SpecConfig,
    batch: int,
    caps: tuple[int | None, ...] = CAPS,
    mix_logits: bool = False,
) -> tuple[list[list[int]], int]:
    """Each prompt's tokens, and the drafts accepted in all, decoded `batch` at a time on forks
    of the engine's backends; a finished sequence's slot takes the next prompt at once.
    `mix_logits` hands each sequence the logits of the next one in the batch (the bug a batched
    forward must not have)."""
    slots = [(engine.target, engine.draft_model)]
    for _ in range(batch - 1):
        draft = engine.draft_model.fork() if engine.draft_model else None
        slots.append((engine.target.fork(), draft))
    outputs: list[list[int]] = [[] for _ in prompts]
    waiting = list(range(len(prompts)))
    running: dict[int, tuple[int, object]] = {}  # slot -> (prompt index, decoding)
    step = accepted = 0
    while waiting or running:
        for slot, (target, draft) in enumerate(slots):
            if slot not in running and waiting:
                index = waiting.pop(0)
                decoding = engine.start(prompts[index], sampling(index), spec, None, target, draft)
                running[slot] = (index, decoding)
        proposed = []
        for slot, (index, decoding) in list(running.items()):
            cap = caps[(step + slot) % len(caps)]
            tree = decoding.propose(cap)
            if tree is None:
                accepted += decoding.stats.accepted_tokens
                del running[slot]
            else:
                proposed.append((slot, index, decoding, tree))
        if not proposed:
            continue
        logits = engine.target.forward_trees(
            [decoding.target for _, _, decoding, _ in proposed], [t for *_, t in proposed]
        )
        if mix_logits and len(logits) > 1:
            logits = logits[1:] + logits[:1]
        for (slot, index, decoding, tree), tree_logits in zip(proposed, logits, strict=True):
            if mix_logits and tree_logits.shape[0] != tree.num_nodes + 1:
                tree_logits = tree_logits[:1].expand(tree.num_nodes + 1, -1)
            out = decoding.advance(tree, tree_logits)
            outputs[index].extend(out.token_ids)
            if out.finished:
                accepted += decoding.stats.accepted_tokens
                del running[slot]
        step += 1
    return outputs, accepted


@pytest.fixture(scope="module")
def llm() -> SpecDecoder:
    return SpecDecoder.load("smollm2-135m-instruct")


PROMPTS = [
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef add_three(a, b, c):\n    return",
    "Count from one to ten in words: one, two, three,",
    "Name the planets of the solar system.",
    "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2,",
]


def test_batched_greedy_decoding_is_generates_output_on_a_real_model(llm: SpecDecoder) -> None:
    """Five requests through three slots (so slots are reused), prompt lookup drafting under
    changing caps: each answer is token for token the one `generate` gives alone."""
    engine = llm.engine
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    spec = SpecConfig(drafter="prompt-lookup", controller="fixed", num_draft_tokens=4)
    sampling = SamplingParams(max_new_tokens=24)
    batched, accepted = run_batched(engine, prompts, lambda _: sampling, spec, batch=3)
    alone = [engine.generate(p, sampling, SpecConfig(drafter="none"))[0] for p in prompts]
    assert batched == alone
    assert accepted > 0  # the batched run's drafts were exercised


SAMPLES = 3000


def _sampled(mix_logits: bool) -> tuple[Counter, Counter]:
    target = tiny_torch_backend(num_layers=2, vocab_size=8, seed=3, layer_std=1.0)
    draft = tiny_torch_backend(num_layers=1, vocab_size=8, seed=4, layer_std=1.0)
    engine = Engine(target, draft_model=draft)
    # Two different prompts alternate, so that handing one sequence another's logits matters.
    prompts = [[1, 2, 3] if i % 2 else [6, 4] for i in range(SAMPLES)]
    spec = SpecConfig(drafter="draft-model", controller="fixed", num_draft_tokens=2)

    def sampling(index: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, max_new_tokens=2, seed=index, ignore_eos=True)

    batched, _ = run_batched(engine, prompts, sampling, spec, batch=4, mix_logits=mix_logits)
    plain = [
        engine.generate(prompts[i], sampling(SAMPLES + i), SpecConfig(drafter="none"))[0]
        for i in range(0, SAMPLES, 2)
    ]
    return Counter(tuple(batched[i]) for i in range(0, SAMPLES, 2)), Counter(map(tuple, plain))


def test_batched_sampling_keeps_the_targets_distribution() -> None:
    """Rejection sampling of a draft model's chains, four sequences per forward, caps changing
    by step: the continuations of one prompt follow plain sampling's law (chi-square)."""
    batched, plain = _sampled(mix_logits=False)
    test = homogeneity_test(batched, plain, torch.Generator().manual_seed(0))
    assert test.conclusive and test.p_value > ALPHA, test


def test_a_batch_that_mixes_up_sequences_logits_fails_the_test() -> None:
    """Negative control: a batch that gives a sequence its neighbour's logits changes the law,
    and the same test sees it."""
    batched, plain = _sampled(mix_logits=True)
    test = homogeneity_test(batched, plain, torch.Generator().manual_seed(0))
    assert test.p_value < BROKEN, test


def test_the_planner_drafts_where_forwards_are_memory_bound_and_not_where_compute_bound() -> None:
    sure = [Outlook(0.8, 8), Outlook(0.8, 8)]
    # A forward costs the same up to 16 rows (weights are read once): drafts are nearly free.
    flat = interpolated({1: 0.1, 16: 0.1, 128: 1.0})
    assert plan_draft_lengths(sure, flat) == [7, 7]
    # Every row costs as much as a whole plain forward of one: no draft can pay for itself.
    linear = interpolated({1: 0.1, 128: 12.8})
    assert plan_draft_lengths(sure, linear) == [0, 0]
    # Between the two, the likelier drafts get the rows.
    mixed = [Outlook(0.9, 8), Outlook(0.2, 8)]
    lengths = plan_draft_lengths(mixed, interpolated({1: 0.1, 4: 0.11, 128: 3.0}))
    assert lengths[0] > lengths[1] == 0
    # A plan that promises under MIN_GAIN (5%) more than no drafts is not worth the error of its
    # estimates (one draft: 2.8 tokens in 1.36 s against 2 in 1.0, 2.9% more); 7.7% more is.
    assert plan_draft_lengths(sure, interpolated({2: 1.0, 3: 1.36, 16: 8.0})) == [0, 0]
    assert plan_draft_lengths(sure, interpolated({2: 1.0, 3: 1.30, 16: 8.0})) == [1, 0]
    # Drafting time counts: a drafter as slow as the target never pays.
    slow = [Outlook(0.8, 8, draft_seconds=0.1)]
    assert plan_draft_lengths(slow, flat) == [0]
    assert plan_draft_lengths([], flat) == []


def test_outlook_from_history_starts_at_the_prior_and_follows_the_counts() -> None:
    assert Outlook.from_history(0, 0, 4).acceptance == pytest.approx(0.5)
    assert Outlook.from_history(90, 100, 4).acceptance == pytest.approx(91 / 102)
    assert Outlook.from_history(0, 100, 4).acceptance < 0.01
    cost = interpolated({1: 1.0, 3: 2.0})
    assert (cost(1), cost(2), cost(3), cost(6)) == (1.0, 1.5, 2.0, 4.0)


def test_draft_limit_is_the_controllers_length_within_the_token_limit() -> None:
    """What the planner may give a sequence: its own controller's draft length (rows planned
    beyond it would go unused), less where the token limit is near."""
    engine = Engine(tiny_torch_backend(num_layers=1, vocab_size=16))
    spec = SpecConfig(drafter="prompt-lookup", controller="fixed", num_draft_tokens=3)
    decoding = engine.start([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True), spec)
    assert decoding.draft_limit() == 2  # 3 tokens to go: the root's and two drafts
    decoding = engine.start([1, 2, 3], SamplingParams(max_new_tokens=50, ignore_eos=True), spec)
    assert decoding.draft_limit() == 3
