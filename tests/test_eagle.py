"""The EAGLE-3 head, its drafter and its training, on a tiny random target (fast).

Real-model checks (the 0.5B target with a head trained in the test, drafts accepted, greedy
identity) are in `test_eagle_real.py`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from significance import ALPHA
from tiny_models import tiny_torch_backend

from specdecode.certify import CertifyConfig, certify
from specdecode.config import SamplingParams, SpecConfig
from specdecode.engine import Engine
from specdecode.errors import SpecDecodeError
from specdecode.heads.eagle3 import Eagle3Config, Eagle3Head, load_head, save_head
from specdecode.train.data import TrainingSequence
from specdecode.train.eagle import TrainSettings, train_eagle
from specdecode.train.features import FeatureStore

LAYERS = (1, 2, 4)  # low, middle and the last layer's output of the 4-layer tiny target


@pytest.fixture(scope="module")
def target():
    return tiny_torch_backend(num_layers=4, vocab_size=64, seed=0)


def random_head(target, draft_vocab: int = 40, seed: int = 0) -> Eagle3Head:
    torch.manual_seed(seed)
    config = Eagle3Config.for_target(target.config, draft_vocab, aux_layers=LAYERS)
    head = Eagle3Head(config)
    for parameter in head.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    head.set_draft_vocabulary(torch.randperm(target.vocab_size)[:draft_vocab].sort().values)
    return head


@pytest.fixture(scope="module")
def head_dir(target, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("head")
    save_head(random_head(target), directory)
    return directory


def eagle_spec(head_dir: Path, **changes) -> SpecConfig:
    spec = SpecConfig(
        drafter="eagle", drafter_options={"head": str(head_dir)}, controller="heuristic"
    )
    return replace(spec, **changes)


# ---- the checkpoint -----------------------------------------------------------------------------


def test_checkpoint_has_the_layout_vllm_and_sglang_load(target, head_dir: Path) -> None:
    config = json.loads((head_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["draft_vocab_size"] == 40 and config["vocab_size"] == 64
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(LAYERS)
    assert config["num_hidden_layers"] == 1 and config["tie_word_embeddings"] is False
    tensors = load_file(str(head_dir / "model.safetensors"))
    hidden = target.config.hidden_size
    assert tensors["fc.weight"].shape == (hidden, 3 * hidden)
    assert tensors["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * hidden
    assert tensors["lm_head.weight"].shape == (40, hidden)
    assert tensors["d2t"].dtype == torch.int64 and tensors["d2t"].shape == (40,)
    assert tensors["t2d"].dtype == torch.bool and int(tensors["t2d"].sum()) == 40
    for name in ("midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight", "norm.weight"):
        assert name in tensors
    assert "embed_tokens.weight" not in tensors  # the target's own embedding is used
    # draft id d stands for target id d + d2t[d]
    targets = torch.arange(40) + tensors["d2t"]
    assert torch.equal(tensors["t2d"].nonzero().squeeze(1), targets)


def test_checkpoint_round_trip_keeps_every_weight(target, head_dir: Path) -> None:
    head = random_head(target)
    loaded = load_head(head_dir, target.config, dtype=torch.float32)
    for name, value in head.state_dict().items():
        expected = value.to(torch.bfloat16).to(value.dtype) if value.is_floating_point() else value
        assert torch.equal(loaded.state_dict()[name], expected), name


def test_a_head_for_another_model_is_refused_naming_the_mismatch(target, tmp_path) -> None:
    other = tiny_torch_backend(num_layers=2, vocab_size=64, seed=1)
    with pytest.raises(SpecDecodeError, match=r"reads layers \[1, 2, 4\].*target has 2"):
        load_head(_saved(random_head(target), tmp_path / "layers"), other.config)
    wide = replace(target.config, hidden_size=48, head_dim=12)
    with pytest.raises(SpecDecodeError, match="hidden states of size 32.*target's are 48"):
        load_head(_saved(random_head(target), tmp_path / "hidden"), wide)
    bigger = replace(target.config, vocab_size=80)
    with pytest.raises(SpecDecodeError, match="vocabulary of 64 tokens.*target's has 80"):
        load_head(_saved(random_head(target), tmp_path / "vocab"), bigger)


def test_a_truncated_or_missing_checkpoint_is_one_line(target, head_dir: Path, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((head_dir / "config.json").read_text())
    data = (head_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SpecDecodeError, match="damaged or truncated"):
        load_head(broken, target.config)
    with pytest.raises(SpecDecodeError, match="has no config.json"):
        load_head(tmp_path, target.config)


def _saved(head: Eagle3Head, directory: Path) -> Path:
    save_head(head, directory)
    return directory


# ---- the drafter ---------------------------------------------------------------------------


def plain(target, prompt, count):
    engine = Engine(target, None)
    out, _, _ = engine.generate(
        prompt, SamplingParams(max_new_tokens=count, ignore_eos=True), SpecConfig(drafter="none")
    )
    return out


@pytest.mark.parametrize("tree", ["chain", "dynamic", "static"])
def test_greedy_output_is_plain_decoding_on_chains_and_trees(target, head_dir, tree) -> None:
    prompt = list(range(3, 30))
    expected = plain(target, prompt, 80)
    out, _, stats = Engine(target, None).generate(
        prompt,
        SamplingParams(max_new_tokens=80, ignore_eos=True),
        eagle_spec(head_dir, tree=tree, tree_width=3),
    )
    assert out == expected
    assert stats.drafted_tokens > 0


def test_sampled_drafts_carry_the_heads_distribution_over_the_full_vocabulary(
    target, head_dir
) -> None:
    seen: list = []
    Engine(target, None).generate(
        list(range(3, 20)),
        SamplingParams(temperature=1.0, max_new_tokens=20, seed=3, ignore_eos=True),
        eagle_spec(head_dir),
        observe=lambda tree, logits, verdict: seen.append(tree),
    )
    head = load_head(head_dir, target.config)
    outside = ~head.t2d
    drafted = [tree for tree in seen if tree.num_nodes]
    assert drafted
    for tree in drafted:
        assert tree.draft_probs.shape == (tree.num_nodes, target.vocab_size)
        assert torch.allclose(tree.draft_probs.sum(-1), torch.ones(tree.num_nodes), atol=1e-5)
        assert float(tree.draft_probs[:, outside].abs().sum()) == 0.0  # never outside its vocab
        assert bool(head.t2d[tree.tokens].all())


def test_drafters_that_read_no_hidden_states_make_the_target_capture_none(target, head_dir) -> None:
    engine = Engine(target, None)
    sampling = SamplingParams(max_new_tokens=8, ignore_eos=True)
    engine.generate(list(range(3, 20)), sampling, eagle_spec(head_dir))
    assert target.last_hidden is not None and target.last_hidden.shape[1:] == (3, 32)
    engine.generate(list(range(3, 20)), sampling, SpecConfig(drafter="prompt-lookup"))
    assert target.hidden_layers == () and target.last_hidden is None


def test_captured_hidden_states_are_the_forwards_own(target) -> None:
    """Layer 0 is the embedding; the last layer's output, normed and projected, gives the
    logits; prefill and verification rows agree with one forward over the same tokens."""
    tokens = torch.arange(5, 25)
    target.capture_hidden((0, target.config.num_layers))
    target.reset()
    target.take_captured()
    logits = target.forward(tokens)
    hidden = target.take_captured()  # [20, 2, H]
    assert torch.equal(hidden[:, 0], target.model.embed.weight[tokens])
    model = target.model
    final = torch.nn.functional.rms_norm(
        hidden[:, 1], (32,), model.final_norm, target.config.rms_norm_eps
    )
    assert torch.allclose(model.lm_head(final).float(), logits, atol=1e-4)
    target.prefill(tokens[:12].tolist())
    assert torch.equal(target.prompt_hidden, hidden[:11])
    target.capture_hidden(())


def test_layers_beyond_the_model_are_refused(target) -> None:
    with pytest.raises(SpecDecodeError, match="the model has 4 layers"):
        target.capture_hidden((1, 5))


def test_the_llamacpp_and_hf_backends_refuse_in_one_line() -> None:
    from specdecode.backends.hf import HFBackend
    from specdecode.backends.llamacpp import LlamaCppBackend

    for backend in (HFBackend, LlamaCppBackend):
        assert not backend.supports_hidden_states
        assert "--backend torch" in backend.hidden_states_refusal


def test_no_head_yet_names_the_command_that_makes_it(target, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPECDECODE_CACHE", str(tmp_path))
    engine = Engine(target, None, model_name="qwen2.5-coder-1.5b-instruct")
    with pytest.raises(SpecDecodeError) as error:
        engine.generate(
            [1, 2, 3],
            SamplingParams(max_new_tokens=4),
            SpecConfig(drafter="eagle", controller="heuristic"),
        )
    message = str(error.value)
    assert "specdecode train-drafter --model qwen2.5-coder-1.5b-instruct --kind eagle" in message
    assert "\n" not in message


# ---- training ------------------------------------------------------------------------------


def _examples(target, tmp_path: Path, count: int = 24, length: int = 96):
    generator = torch.Generator().manual_seed(5)
    sequences = [
        TrainingSequence(
            torch.randint(0, target.vocab_size, (length,), generator=generator).tolist(),
            [True] * length,
            "random",
        )
        for _ in range(count)
    ]
    store = FeatureStore(tmp_path / "features", LAYERS)
    store.compute(target, sequences)
    return store.load(sequences)


SETTINGS = TrainSettings(
    draft_vocab=48,
    intermediate_size=64,
    ttt_steps=2,
    epochs=12,
    learning_rate=1e-2,
    batch_tokens=400,
    heldout_fraction=0.2,
    checkpoint_every=5,
    bfloat16=False,
)


def _train(target, examples, work: Path, stop_after=None):
    model = target.model
    config = Eagle3Config.for_target(target.config, SETTINGS.draft_vocab, 64, LAYERS)
    return train_eagle(
        examples,
        config,
        model.embed.weight.detach(),
        model.lm_head.weight.detach(),
        model.final_norm.detach(),
        SETTINGS,
        work,
        stop_after=stop_after,
    )


@pytest.fixture(scope="module")
def learnable():
    """A target whose next token depends mostly on the last one: a head can learn it."""
    return tiny_torch_backend(num_layers=4, vocab_size=64, seed=2, layer_std=0.05)


@pytest.fixture(scope="module")
def examples(learnable, tmp_path_factory):
    return _examples(learnable, tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module")
def trained(learnable, examples, tmp_path_factory):
    return _train(learnable, examples, tmp_path_factory.mktemp("work"))


def test_training_lowers_the_loss_and_raises_held_out_agreement(trained) -> None:
    _, report = trained
    # about 0.66 after training, from 0.04 before and 0.12 for the most frequent token, on 475
    # held-out predictions (a standard error of about 0.02)
    first_step = report.agreement[0]
    assert first_step > report.initial_agreement[0] + 0.3
    assert first_step > report.baseline + 0.3
    assert report.expected_tokens_per_forward > 1.5


def test_training_without_the_gradient_applied_learns_nothing(
    learnable, examples, tmp_path, monkeypatch
) -> None:
    """The negative control of the test above: an optimizer that never steps."""
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
    _, report = _train(learnable, examples, tmp_path)
    assert report.agreement == report.initial_agreement


def test_a_training_fraction_trains_on_less_and_holds_out_the_same(examples) -> None:
    """A learning curve's points differ in their training data only."""
    from dataclasses import replace

    from specdecode.train.loop import split

    train, heldout = split(examples, SETTINGS)
    part, part_heldout = split(examples, replace(SETTINGS, train_fraction=0.25))
    assert [id(e) for e in part_heldout] == [id(e) for e in heldout]
    assert len(part) == round(len(train) * 0.25) < len(train)
    assert [id(e) for e in part] == [id(e) for e in train[: len(part)]]


def test_an_interrupted_run_resumes_to_the_uninterrupted_head(
    learnable, examples, trained, tmp_path
) -> None:
    head, _ = trained
    _train(learnable, examples, tmp_path, stop_after=7)  # 7 steps, checkpoint at 5
    resumed, report = _train(learnable, examples, tmp_path)
    assert 0 < report.resumed_from <= 7  # the last checkpoint before the interruption
    for name, value in head.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_a_trained_head_drafts_tokens_the_target_accepts(learnable, trained, tmp_path) -> None:
    head, _ = trained
    save_head(head, tmp_path, dtype=torch.float32)
    prompt = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(9)).tolist()
    expected = plain(learnable, prompt, 60)
    out, _, stats = Engine(learnable, None).generate(
        prompt, SamplingParams(max_new_tokens=60, ignore_eos=True), eagle_spec(tmp_path)
    )
    assert out == expected
    assert stats.accepted_tokens > 0


# ---- sampling -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "verifier"),
    [
        pytest.param("chain", "rejection", marks=pytest.mark.slow),
        pytest.param("dynamic", "specinfer", marks=pytest.mark.slow),
        pytest.param("without-replacement", None, marks=pytest.mark.slow),
    ],
)
def test_sampled_eagle_drafts_keep_the_targets_distribution(
    learnable, trained, tmp_path, tree, verifier
) -> None:
    """certify at temperature 0.25 (sharp enough for drafts to be accepted on the tiny target):
    the first two tokens after the prompt, with the trained head's drafts, against plain sampling: a
    chain with rejection, a dynamic tree, whose nodes are chosen, with SpecInfer, and a tree drawn
    without replacement with its own verifier (slow tier: 2 to 4 minutes each on the Xeon; the
    default tier's check of sampled head drafts is Hydra's, in test_medusa_hydra.py)."""
    head, _ = trained
    save_head(head, tmp_path, dtype=torch.float32)
    spec = eagle_spec(tmp_path, tree=tree, tree_width=2, num_draft_tokens=2, verifier=verifier)
    config = CertifyConfig(samples=3000, length=2, alpha=ALPHA)
    prompt = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    sampling = SamplingParams(temperature=0.25)
    report = certify(Engine(learnable, None), prompt, sampling, spec, config)
    assert report.test.conclusive and report.test.p_value > ALPHA, report.summary()
    assert report.speculative_tokens_per_forward > 1.05  # drafts were accepted (about 1.15)


def test_drafting_computes_what_training_trains(target, tmp_path) -> None:
    """The drafter's head outputs (its KV cache, positions and masks) equal the training-time
    test's on the same sequence, at draft steps 0 and 1: what is trained is what drafts."""
    from specdecode.drafters.base import TargetOutput
    from specdecode.drafters.eagle import EagleDrafter
    from specdecode.train.ttt import Example, ttt_outputs

    save_head(random_head(target), tmp_path, dtype=torch.float32)
    head = load_head(tmp_path, target.config, dtype=torch.float32)
    tokens = torch.arange(3, 23)
    target.capture_hidden(LAYERS)
    target.reset()
    target.take_captured()
    target.forward(tokens)
    example = Example(target.take_captured(), tokens, tokens, torch.ones(20, dtype=torch.bool))
    outputs = ttt_outputs(head, target.model.embed.weight, example, steps=2)
    drafter = EagleDrafter(head, target)
    for n in (5, 12):
        prompt = tokens[:n].tolist()
        target.prefill(prompt)
        drafter.begin(prompt, SamplingParams(), None, TargetOutput(None, target.prompt_hidden))
        drafter._catch_up()
        # step 0, row n-2: the pair (features at token n-2, token n-1) at position n-2
        assert torch.allclose(drafter._last_out, outputs[0][n - 2], atol=1e-4)
        # step 1, row n-2: the pair (that output, token n) at position n-1
        step1 = head.step(
            drafter.cache,
            drafter._last_out[None],
            target.token_embeddings(tokens[n : n + 1]),
            torch.tensor([n - 1]),
        )
        assert torch.allclose(step1[0], outputs[1][n - 2], atol=1e-4)
    target.capture_hidden(())


# ---- the command line -------------------------------------------------------------------------


def test_command_line_refusals_are_one_line_before_any_model_loads(tmp_path, capsys) -> None:
    from specdecode.cli import main

    cases = [
        (["generate", "hi", "--head", str(tmp_path)], "--head names a trained head"),
        (["train-drafter", "--model", "m", "--kind", "lookahead"], "invalid choice"),
        (["train-drafter", "--model", "m", "--data", str(tmp_path / "no.txt")], "cannot read"),
        (["train-drafter", "--model", "m", "--draft-vocab", "1"], "draft vocabulary of at least"),
        (["train-drafter", "--model", "m", "--intermediate-size", "-4"], "intermediate size"),
        (["train-drafter", "--model", "m", "--train-fraction", "0"], "training fraction"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, (argv, err)


def test_bench_refuses_an_eagle_method_without_a_head(tmp_path, monkeypatch, capsys) -> None:
    from specdecode.cli import main

    monkeypatch.setenv("SPECDECODE_CACHE", str(tmp_path))
    argv = ["bench", "--model", "qwen2.5-coder-0.5b-instruct", "--methods", "eagle"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "specdecode train-drafter --model qwen2.5-coder-0.5b-instruct --kind eagle" in err
