"""Kangaroo's adapter (`specdecode.heads.kangaroo`), its training and the `kangaroo` drafter.

- An untrained adapter is plain early exit: its drafts' logits are the target's at the exit layer.
- Checkpoints round-trip; an adapter of another model, a damaged file, an exit layer out of range
  and a backend that cannot exit early are one clear error; no adapter yet names the command.
- Training raises the held-out agreement above early exit's (and an optimizer that never steps
  leaves it where it was: the negative control).
- Drafting computes what training trains: every row a chain or a tree fed scores the logits of the
  adapter run over that node's whole path at once (with random attention weights, so that a
  wrong mask or position shows; both were checked to fail it).
- Greedy output equals plain decoding's with drafts accepted (tiny model: chains and trees; a real
  model: the 135M with an adapter trained here on its own answers); the adapter's cache holds
  exactly the committed tokens' entries afterwards, which a drafter that kept its drafts' entries
  fails; certify passes at temperature 1 (slow).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from certified import assert_certify_passes
from tiny_models import decode_greedily, examples_of, tiny_torch_backend

from specdecode import SamplingParams, SpecConfig, SpecDecoder
from specdecode.backends.base import LayerPlan
from specdecode.cli import CERTIFY_PROMPT
from specdecode.drafters import DrafterResources, TargetOutput, make_drafter
from specdecode.drafters.kangaroo import KangarooDrafter
from specdecode.engine import Engine
from specdecode.errors import SpecDecodeError
from specdecode.heads.kangaroo import (
    KangarooAdapter,
    KangarooConfig,
    default_exit_layer,
    load_adapter,
    save_adapter,
)
from specdecode.train.batched import generate_answers
from specdecode.train.kangaroo import train_kangaroo
from specdecode.train.loop import TrainSettings
from specdecode.tree import Budget

EXIT = 1

SETTINGS = TrainSettings(
    draft_vocab=48,
    epochs=20,
    learning_rate=3e-3,
    batch_tokens=512,
    heldout_fraction=0.2,
    checkpoint_every=1000,
    bfloat16=False,
)


@pytest.fixture(scope="module")
def target():
    """Four layers: the exit after the first agrees with the whole model 3 times in 4 before
    training, room an adapter can learn to close."""
    return tiny_torch_backend(num_layers=4, vocab_size=64, seed=2, layer_std=0.1)


def untrained(target, draft_vocab: tuple[int, ...] | None = None) -> KangarooAdapter:
    """Training's starting point: early exit at EXIT through the adapter's norm (the target's)."""
    config = replace(
        KangarooConfig.for_target(target.config, EXIT),
        draft_vocab=draft_vocab or tuple(range(target.vocab_size)),
    )
    adapter = KangarooAdapter(config)
    vocab = torch.tensor(config.draft_vocab)
    with torch.no_grad():
        adapter.o_proj.weight.zero_()
        adapter.norm.weight.copy_(target.model.final_norm.float())
        adapter.lm_head.weight.copy_(target.model.lm_head.weight[vocab].float())
    return adapter.eval().requires_grad_(False)


def plain(target, prompt: list[int], count: int) -> list[int]:
    sampling = SamplingParams(max_new_tokens=count, ignore_eos=True)
    out, _, _ = Engine(target, None).generate(prompt, sampling, SpecConfig(drafter="none"))
    return out


def spec(directory: Path, **changes) -> SpecConfig:
    base = SpecConfig(
        drafter="kangaroo",
        drafter_options={"head": str(directory), "min_confidence": 0.0},
        controller="heuristic",
    )
    return replace(base, **changes)


PROMPT = list(range(3, 33))


def test_an_untrained_adapter_drafts_what_early_exit_drafts(target) -> None:
    target.reset()
    drafter = KangarooDrafter(target, untrained(target), min_confidence=0.0)
    ids = torch.tensor(PROMPT[:6])
    exited = target.forward_partial(ids, LayerPlan(exit_layer=EXIT))
    target.truncate(0)
    through_adapter = drafter.draft_logits(drafter.exit_plan, ids, None, None)
    assert torch.allclose(through_adapter, exited, atol=1e-4)


def test_the_defaults_are_kangaroos_exit_and_more_epochs_than_the_heads() -> None:
    from specdecode.train.command import default_epochs

    assert default_exit_layer(32) == 2
    assert default_exit_layer(28) == 2
    assert default_exit_layer(8) == 1
    assert default_epochs("kangaroo") > default_epochs("eagle") == TrainSettings().epochs


def test_a_checkpoint_round_trips_and_a_wrong_one_is_refused_in_one_line(target, tmp_path) -> None:
    adapter = untrained(target, tuple(range(0, 64, 2)))
    torch.nn.init.normal_(adapter.q_proj.weight, std=0.3)
    save_adapter(adapter, tmp_path / "a", torch.float32)
    back = load_adapter(tmp_path / "a", target.config, dtype=torch.float32)
    for name, tensor in adapter.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert back.cfg.exit_layer == EXIT and back.cfg.draft_vocab == adapter.cfg.draft_vocab
    other = tiny_torch_backend(num_layers=6, vocab_size=64, seed=2)
    with pytest.raises(SpecDecodeError, match="trained for a model of"):
        load_adapter(tmp_path / "a", other.config)
    weights = tmp_path / "a" / "kangaroo_adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SpecDecodeError, match="damaged or truncated"):
        load_adapter(tmp_path / "a", target.config)
    with pytest.raises(SpecDecodeError, match="not a draft head"):
        load_adapter(tmp_path / "missing", target.config)
    with pytest.raises(SpecDecodeError, match="exit layer must be 1 to 3"):
        KangarooConfig.for_target(target.config, 4)


def test_no_adapter_yet_names_the_command_that_makes_it(target, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPECDECODE_CACHE", str(tmp_path))
    resources = DrafterResources(target, model_name="qwen2.5-coder-1.5b-instruct")
    with pytest.raises(SpecDecodeError, match="--kind kangaroo"):
        make_drafter("kangaroo", {}, resources)


@pytest.fixture(scope="module")
def examples(target):
    """The target's own greedy continuations of random prompts, with the exit layer's states."""
    generator = torch.Generator().manual_seed(5)
    prompts = [
        torch.randint(0, target.vocab_size, (8,), generator=generator).tolist() for _ in range(30)
    ]
    return examples_of(generate_answers(target.model, prompts, 88, frozenset(), (EXIT,), batch=10))


def train(target, examples, work: Path):
    config = KangarooConfig.for_target(target.config, EXIT)
    model = target.model
    return train_kangaroo(
        examples, config, model.lm_head.weight.detach(), model.final_norm.detach(), SETTINGS, work
    )


@pytest.fixture(scope="module")
def trained(target, examples, tmp_path_factory):
    return train(target, examples, tmp_path_factory.mktemp("kangaroo-work"))


def test_training_raises_the_agreement_above_early_exits(trained) -> None:
    _, report = trained
    assert len(report.agreement) == 1
    # Before training the adapter is early exit at layer 1.
    assert report.agreement[0] > report.initial_agreement[0] + 0.15, report
    assert report.agreement[0] > report.baseline + 0.3, report


def test_training_without_the_gradient_applied_learns_nothing(
    target, examples, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
    _, report = train(target, examples, tmp_path)
    assert report.agreement == report.initial_agreement


@pytest.mark.parametrize("tree", ["chain", "static", "dynamic"])
def test_greedy_output_is_plain_decoding_with_drafts_accepted(
    target, trained, tmp_path, tree
) -> None:
    adapter, _ = trained
    save_adapter(adapter, tmp_path, torch.float32)
    expected = plain(target, PROMPT, 60)
    chosen = spec(tmp_path, tree=tree, tree_width=2, tree_nodes=8)
    out, _, stats = Engine(target, None).generate(
        PROMPT, SamplingParams(max_new_tokens=60, ignore_eos=True), chosen
    )
    assert out == expected
    assert stats.accepted_tokens > 10


class _Recording(KangarooDrafter):
    """Keeps what each drafting forward fed and scored: (token, position, logits) per row."""

    def draft_logits(self, plan, ids, positions, mask):
        if positions is None:
            positions = torch.arange(self.target.num_cached, self.target.num_cached + len(ids))
        logits = super().draft_logits(plan, ids, positions, mask)
        self.scored += list(zip(ids.tolist(), positions.tolist(), logits, strict=True))
        return logits


def scrambled(adapter: KangarooAdapter) -> KangarooAdapter:
    """The adapter with random attention weights, so that what each row attends to (its mask,
    its position, the cache's entries) moves its logits far."""
    changed = KangarooAdapter(adapter.cfg)
    changed.load_state_dict(adapter.state_dict())
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in (changed.q_proj, changed.k_proj, changed.v_proj, changed.o_proj):
            layer.weight.normal_(std=0.5, generator=generator)
    return changed.eval().requires_grad_(False)


def _expected_logits(target, adapter, tokens: list[int]) -> torch.Tensor:  # [V]
    """What training computes over `tokens`: the adapter over the whole sequence's exit states,
    the logits at the last row (-inf outside the draft vocabulary)."""
    target.reset()
    states = target.forward_partial(torch.tensor(tokens), LayerPlan(exit_layer=EXIT), hidden=True)
    target.reset()
    draft = adapter.logits(adapter.sequence(states.to(adapter.q_proj.weight.dtype))).float()
    logits = torch.full((target.vocab_size,), float("-inf"))
    logits[adapter.target_ids] = draft[-1]
    return logits


def _path(drafted, node: int) -> list[int]:
    path, parents = [], drafted.parents.tolist()
    while node >= 0:
        path.insert(0, int(drafted.tokens[node]))
        node = parents[node]
    return path


@pytest.mark.parametrize("tree", ["chain", "static"])
def test_drafting_computes_what_training_trains(target, trained, tree) -> None:
    """Every row a draft fed (the root, then each node that was expanded) scored the logits the
    adapter gives when run over that node's whole path at once, as in training: the adapter's
    cache, positions, rotations and tree masks in step with the target's."""
    from specdecode.trees import make_tree_shape

    adapter = scrambled(trained[0])
    shape = None if tree == "chain" else make_tree_shape(tree, {})
    drafter = _Recording(target, adapter, min_confidence=0.0, tree=shape)
    drafter.scored = []
    context = PROMPT[:20]
    target.reset()
    target.capture_hidden(drafter.hidden_layers)
    target.prefill(context)
    drafter.begin(context, SamplingParams(), None, TargetOutput(hidden=target.prompt_hidden))
    drafted = drafter.propose(context, Budget(3, 2, 8) if shape else Budget.chain(4))
    target.capture_hidden(())
    assert drafted.num_nodes == (8 if shape else 4)
    depth = {-1: 0}
    for node, parent in enumerate(drafted.parents.tolist()):
        depth[node] = depth[parent] + 1
    root = len(context) - 1
    assert len(drafter.scored) >= 4
    for token, position, logits in drafter.scored:
        # The nodes this row could be (cousins may share a token at one depth).
        nodes = [n for n in depth if depth[n] == position - root]
        nodes = [n for n in nodes if n == -1 or int(drafted.tokens[n]) == token]
        assert nodes, (token, position)
        finite = torch.isfinite(logits)
        assert any(
            torch.allclose(
                logits[finite],
                _expected_logits(target, adapter, context + _path(drafted, n))[finite],
                atol=1e-3,
            )
            for n in nodes
        ), (token, position)


class _KeepsItsDrafts(KangarooDrafter):
    """Broken on purpose: the adapter's entries of a step's drafts stay in its cache."""

    def drop_drafts(self, committed: int) -> None:
        self.target.truncate(committed)


@pytest.mark.parametrize(("drafter", "exact"), [(KangarooDrafter, True), (_KeepsItsDrafts, False)])
def test_the_adapters_cache_holds_exactly_the_committed_tokens(
    target, trained, drafter, exact
) -> None:
    """After decoding, the adapter's cache holds the committed tokens' entries alone, equal to
    a fresh run over the whole context's exit states; a drafter that kept its drafts' entries is
    caught (its cache runs ahead of the context)."""
    adapter, _ = trained
    made = drafter(target, adapter, min_confidence=0.0)
    context = PROMPT + decode_greedily(target, made, PROMPT, 30)
    made.propose(context, Budget.chain(0))  # runs the last accepted states through it
    target.reset()
    target.prefill(context)
    fresh = adapter.new_cache(256)
    adapter.step(fresh, target.prompt_hidden[:, 0], torch.arange(len(context) - 1))
    target.capture_hidden(())
    assert fresh.length == len(context) - 1
    rows = slice(0, fresh.length)
    holds = (
        made.cache.length == fresh.length
        and torch.allclose(made.cache.k[:, rows], fresh.k[:, rows], atol=1e-4)
        and torch.allclose(made.cache.v[:, rows], fresh.v[:, rows], atol=1e-4)
    )
    assert holds == exact


# ---- a real model ------------------------------------------------------------------------------

REAL = "smollm2-135m-instruct"
CODE = "Write a Python function that returns the n-th Fibonacci number, with a docstring."
TOKENS = 48


@pytest.fixture(scope="module")
def llm() -> SpecDecoder:
    return SpecDecoder.load(REAL)


@pytest.fixture(scope="module")
def real_adapter(llm: SpecDecoder, tmp_path_factory) -> Path:
    """An adapter trained in seconds on the model's answers to CODE and to certify's prompt (a
    test of the machinery, not of the adapter's generality: the real recipe is `specdecode
    train-drafter --kind kangaroo`)."""
    target = llm.target
    config = KangarooConfig.for_target(target.model_config, None)
    prompts = [llm.encode_prompt(CODE), llm.encode_prompt(CERTIFY_PROMPT, chat=False)]
    made = generate_answers(
        target.model, prompts, TOKENS + 8, frozenset(), (config.exit_layer,), batch=2
    )
    settings = replace(SETTINGS, draft_vocab=512, epochs=60, heldout_fraction=0.2)
    weights = target.model
    adapter, report = train_kangaroo(
        examples_of(made) * 5,  # held out: a copy
        config,
        weights.lm_head.weight.detach(),
        weights.final_norm.detach(),
        settings,
        tmp_path_factory.mktemp("real-work"),
    )
    assert report.agreement[0] > 0.6, report
    directory = tmp_path_factory.mktemp("real-adapter")
    save_adapter(adapter, directory)
    return directory


def test_greedy_output_is_plain_decodings_on_a_real_model(llm: SpecDecoder, real_adapter) -> None:
    sampling = SamplingParams(max_new_tokens=TOKENS)
    expected = llm.generate(CODE, sampling, SpecConfig(drafter="none"))
    fast = llm.generate(CODE, sampling, spec(real_adapter))
    assert fast.token_ids == expected.token_ids
    assert fast.stats.mean_accepted_tokens > 1.5  # drafts were accepted


@pytest.mark.slow
def test_sampling_passes_certify(llm: SpecDecoder, real_adapter) -> None:
    chosen = SpecConfig(
        drafter="kangaroo",
        drafter_options={"head": str(real_adapter)},
        controller="fixed",
        num_draft_tokens=3,
    )
    assert_certify_passes(llm, chosen)
