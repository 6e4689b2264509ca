"""Medusa-1 and Hydra heads, their drafters and their training, on a tiny random target (fast)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from significance import ALPHA
from tiny_models import examples_of, tiny_torch_backend

from specdecode.certify import CertifyConfig, certify
from specdecode.config import SamplingParams, SpecConfig
from specdecode.engine import Engine
from specdecode.errors import SpecDecodeError
from specdecode.heads import hydra, medusa
from specdecode.train.batched import generate_answers
from specdecode.train.hydra import train_hydra
from specdecode.train.loop import TrainSettings
from specdecode.train.medusa import train_medusa

HEADS = 3


@dataclass(frozen=True)
class Kind:
    name: str
    module: Any  # specdecode.heads.medusa or .hydra
    config: type
    heads: type

    def save(self, heads, target, directory: Path) -> Path:
        if self.module is medusa:
            medusa.save_heads(heads, target.model.lm_head.weight, directory, torch.float32)
        else:
            hydra.save_heads(heads, directory, torch.float32)
        return directory

    def train(self, target, examples, work: Path, settings: TrainSettings):
        config = self.config(target.config.hidden_size, target.vocab_size, settings.num_heads)
        model, eps = target.model, target.config.rms_norm_eps
        lm_head, norm = model.lm_head.weight.detach(), model.final_norm.detach()
        if self.module is medusa:
            return train_medusa(examples, config, lm_head, norm, eps, settings, work)
        embed = model.embed.weight.detach()
        return train_hydra(examples, config, embed, lm_head, norm, eps, settings, work)


MEDUSA = Kind("medusa", medusa, medusa.MedusaConfig, medusa.MedusaHeads)
HYDRA = Kind("hydra", hydra, hydra.HydraConfig, hydra.HydraHeads)
KINDS = [pytest.param(MEDUSA, id="medusa"), pytest.param(HYDRA, id="hydra")]


@pytest.fixture(scope="module")
def learnable():
    """A target whose next token depends mostly on the last one: heads can learn it."""
    return tiny_torch_backend(num_layers=4, vocab_size=64, seed=2, layer_std=0.05)


def random_heads(kind: Kind, target, draft_vocab: int = 40, seed: int = 0):
    torch.manual_seed(seed)
    vocab = tuple(sorted(torch.randperm(target.vocab_size)[:draft_vocab].tolist()))
    heads = kind.heads(kind.config(target.config.hidden_size, target.vocab_size, HEADS, 1, vocab))
    for parameter in heads.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return heads


def spec(kind: Kind, head_dir: Path, **changes) -> SpecConfig:
    base = SpecConfig(
        drafter=kind.name, drafter_options={"head": str(head_dir)}, controller="heuristic"
    )
    return replace(base, **changes)


def plain(target, prompt, count):
    sampling = SamplingParams(max_new_tokens=count, ignore_eos=True)
    out, _, _ = Engine(target, None).generate(prompt, sampling, SpecConfig(drafter="none"))
    return out


# ---- checkpoints --------------------------------------------------------------------------------


def test_medusa_checkpoint_has_the_medusa_repositorys_layout(learnable, tmp_path) -> None:
    heads = random_heads(MEDUSA, learnable)
    MEDUSA.save(heads, learnable, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_num_heads"] == HEADS and config["medusa_num_layers"] == 1
    assert "base_model_name_or_path" in config
    tensors = load_file(str(tmp_path / medusa.WEIGHTS_FILE))
    hidden, vocab = learnable.config.hidden_size, learnable.vocab_size
    expected = {}
    for k in range(HEADS):
        expected |= {f"{k}.0.linear.weight": (hidden, hidden), f"{k}.0.linear.bias": (hidden,)}
        expected[f"{k}.1.weight"] = (vocab, hidden)  # the full vocabulary, as Medusa's
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected
    # Rows outside the draft vocabulary are the target's own output layer.
    outside = sorted(set(range(vocab)) - set(heads.cfg.draft_vocab))
    assert torch.equal(tensors["0.1.weight"][outside], learnable.model.lm_head.weight[outside])


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trip_keeps_every_weight(kind: Kind, learnable, tmp_path) -> None:
    heads = random_heads(kind, learnable)
    kind.save(heads, learnable, tmp_path)
    loaded = kind.module.load_heads(tmp_path, learnable.config, dtype=torch.float32)
    for name, value in heads.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


@pytest.mark.parametrize("kind", KINDS)
def test_heads_of_another_model_or_a_damaged_file_are_refused_in_one_line(
    kind: Kind, learnable, tmp_path
) -> None:
    other = tiny_torch_backend(num_layers=4, vocab_size=80, seed=1)
    kind.save(random_heads(kind, other), other, tmp_path / "other")
    with pytest.raises(SpecDecodeError, match="vocabulary of 80 tokens"):
        kind.module.load_heads(tmp_path / "other", learnable.config)
    directory = kind.save(random_heads(kind, learnable), learnable, tmp_path / "cut")
    weights = directory / kind.module.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SpecDecodeError, match="damaged or truncated"):
        kind.module.load_heads(directory, learnable.config)
    (tmp_path / "eagle").mkdir()
    (tmp_path / "eagle" / "config.json").write_text('{"architectures": ["LlamaForCausalLMEagle3"]}')
    with pytest.raises(SpecDecodeError, match=f"not a {kind.name.capitalize()} head"):
        kind.module.load_heads(tmp_path / "eagle", learnable.config)


# ---- training -----------------------------------------------------------------------------------


SETTINGS = TrainSettings(
    draft_vocab=48,
    num_heads=HEADS,
    epochs=12,
    learning_rate=1e-2,
    batch_tokens=400,
    heldout_fraction=0.2,
    checkpoint_every=5,
    bfloat16=False,
)


@pytest.fixture(scope="module")
def examples(learnable):
    """The target's own greedy continuations of random prompts, with their features (Medusa's
    heads see no drafted token, so they can only learn text the target itself wrote)."""
    generator = torch.Generator().manual_seed(5)
    prompts = [
        torch.randint(0, learnable.vocab_size, (8,), generator=generator).tolist()
        for _ in range(24)
    ]
    layers = (learnable.config.num_layers,)
    made = generate_answers(learnable.model, prompts, 88, frozenset(), layers, batch=8)
    return examples_of(made)


@pytest.fixture(scope="module")
def trained(learnable, examples, tmp_path_factory):
    return {
        kind.name: kind.train(learnable, examples, tmp_path_factory.mktemp(kind.name), SETTINGS)
        for kind in (MEDUSA, HYDRA)
    }


@pytest.mark.parametrize("kind", KINDS)
def test_training_raises_each_heads_held_out_agreement(kind: Kind, trained) -> None:
    _, report = trained[kind.name]
    assert len(report.agreement) == HEADS
    # The first head predicts two tokens past the last one run: far above its start (the
    # target's own output layer predicts the token before) and the most frequent token.
    assert report.agreement[0] > report.initial_agreement[0] + 0.2, report
    assert report.agreement[0] > report.baseline + 0.2, report


@pytest.mark.parametrize("kind", KINDS)
def test_training_without_the_gradient_applied_learns_nothing(
    kind: Kind, learnable, examples, tmp_path, monkeypatch
) -> None:
    """The negative control of the test above: an optimizer that never steps."""
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
    _, report = kind.train(learnable, examples, tmp_path, SETTINGS)
    assert report.agreement == report.initial_agreement


# ---- the drafters -------------------------------------------------------------------------------


@pytest.mark.parametrize("tree", ["chain", "dynamic", "static"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_output_is_plain_decoding_with_drafts_accepted(
    kind: Kind, learnable, trained, tmp_path, tree
) -> None:
    heads, _ = trained[kind.name]
    kind.save(heads, learnable, tmp_path)
    prompt = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(9)).tolist()
    expected = plain(learnable, prompt, 60)
    chosen = spec(kind, tmp_path, tree=tree, tree_width=2)
    out, _, stats = Engine(learnable, None).generate(
        prompt, SamplingParams(max_new_tokens=60, ignore_eos=True), chosen
    )
    assert out == expected
    assert stats.accepted_tokens > 0


@pytest.mark.parametrize("kind", KINDS)
def test_random_heads_cost_speed_never_output(kind: Kind, learnable, tmp_path) -> None:
    kind.save(random_heads(kind, learnable), learnable, tmp_path)
    prompt = list(range(3, 30))
    expected = plain(learnable, prompt, 50)
    out, _, _ = Engine(learnable, None).generate(
        prompt, SamplingParams(max_new_tokens=50, ignore_eos=True), spec(kind, tmp_path)
    )
    assert out == expected


# Medusa's case (about 3 minutes on the Xeon) in the slow tier; Hydra's keeps the default one's.
@pytest.mark.parametrize(
    "kind", [pytest.param(MEDUSA, id="medusa", marks=pytest.mark.slow), KINDS[1]]
)
def test_sampled_drafts_keep_the_targets_distribution(
    kind: Kind, learnable, trained, tmp_path
) -> None:
    """certify at temperature 0.25 (as eagle's): the first two tokens after the prompt, with the
    trained heads' drafts on a chain with rejection, against plain sampling."""
    heads, _ = trained[kind.name]
    kind.save(heads, learnable, tmp_path)
    chosen = spec(kind, tmp_path, num_draft_tokens=2, verifier="rejection")
    config = CertifyConfig(samples=3000, length=2, alpha=ALPHA)
    prompt = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    report = certify(
        Engine(learnable, None), prompt, SamplingParams(temperature=0.25), chosen, config
    )
    assert report.test.conclusive and report.test.p_value > ALPHA, report.summary()
    assert report.speculative_tokens_per_forward > 1.05, report.summary()


@pytest.mark.parametrize("kind", KINDS)
def test_no_head_yet_names_the_command_that_makes_it(
    kind: Kind, learnable, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("SPECDECODE_CACHE", str(tmp_path))
    from specdecode.drafters import DrafterResources, make_drafter

    resources = DrafterResources(learnable, model_name="qwen2.5-coder-1.5b-instruct")
    with pytest.raises(SpecDecodeError, match=f"--kind {kind.name}"):
        make_drafter(kind.name, {}, resources)


def test_a_draft_vocabulary_listing_a_token_twice_is_refused(learnable) -> None:
    """Sampled drafts carry their distribution over the full vocabulary; a token listed twice
    would lose part of its probability there."""
    with pytest.raises(SpecDecodeError, match="twice"):
        medusa.MedusaConfig(learnable.config.hidden_size, learnable.vocab_size, 2, 1, (3, 5, 3))


def test_a_medusa_repository_config_without_sizes_takes_the_targets(learnable, tmp_path) -> None:
    heads = random_heads(MEDUSA, learnable, draft_vocab=learnable.vocab_size)
    MEDUSA.save(heads, learnable, tmp_path)
    published = {"medusa_num_heads": HEADS, "medusa_num_layers": 1, "base_model_name_or_path": ""}
    (tmp_path / "config.json").write_text(json.dumps(published))
    loaded = medusa.load_heads(tmp_path, learnable.config, dtype=torch.float32)
    assert loaded.cfg.draft_vocab == tuple(range(learnable.vocab_size))
    for name, value in heads.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_heads_that_misreport_their_draft_distribution_fail_certify(
    learnable, trained, tmp_path, monkeypatch
) -> None:
    """The negative control of the certify test: Medusa drafts drawn from the heads but reported
    to the verifier as uniform over the draft vocabulary change the output's distribution."""
    from significance import BROKEN

    from specdecode.drafters.last_state import LastStateDrafter

    real = LastStateDrafter.full_vocab

    def misreported(self, draft_values, fill):
        if fill == 0.0:  # the draft_probs of a sampled chain
            draft_values = torch.full_like(draft_values, 1.0 / draft_values.shape[-1])
        return real(self, draft_values, fill)

    monkeypatch.setattr(LastStateDrafter, "full_vocab", misreported)
    heads, _ = trained["medusa"]
    MEDUSA.save(heads, learnable, tmp_path)
    chosen = spec(MEDUSA, tmp_path, num_draft_tokens=2, verifier="rejection")
    config = CertifyConfig(samples=3000, length=2, alpha=ALPHA)
    prompt = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    report = certify(
        Engine(learnable, None), prompt, SamplingParams(temperature=0.25), chosen, config
    )
    assert report.test.p_value < BROKEN, report.summary()
