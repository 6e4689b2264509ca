"""Medusa and Hydra heads on a real model: the 0.5B with heads trained here in seconds on the
model's own answers (so that their drafts are accepted), greedy output token-identical to plain
decoding on a chain and a dynamic tree, and the llama.cpp backend's refusal."""

from __future__ import annotations

import pytest
from tiny_models import examples_of

from specdecode import SpecDecoder
from specdecode.config import SamplingParams, SpecConfig
from specdecode.heads import hydra, medusa
from specdecode.train.batched import generate_answers
from specdecode.train.hydra import train_hydra
from specdecode.train.loop import TrainSettings
from specdecode.train.medusa import train_medusa

SMALL = "qwen2.5-coder-0.5b-instruct"
PROMPTS = (
    "Explain in three sentences why the sky is blue.",
    "List the planets of the solar system in order, one per line.",
)
TOKENS = 64


@pytest.fixture(scope="module")
def small() -> SpecDecoder:
    return SpecDecoder.load(SMALL)


@pytest.fixture(scope="module")
def plain(small: SpecDecoder) -> dict[str, list[int]]:
    sampling = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)
    return {
        prompt: small.engine.generate(
            small.encode_prompt(prompt), sampling, SpecConfig(drafter="none")
        )[0]
        for prompt in PROMPTS
    }


@pytest.fixture(scope="module")
def head_dirs(small: SpecDecoder, tmp_path_factory) -> dict[str, str]:
    """Medusa and Hydra heads trained on the model's answers to PROMPTS (a test of the
    machinery, not of the heads' generality: the real recipe is `specdecode train-drafter`)."""
    target = small.target
    config = target.model_config
    prompts = [small.encode_prompt(p) for p in PROMPTS]
    layers = (config.num_layers,)
    made = generate_answers(target.model, prompts, TOKENS + 8, frozenset(), layers, batch=2)
    examples = examples_of(made) * 4  # held out: a copy
    settings = TrainSettings(
        draft_vocab=1024,
        num_heads=3,
        epochs=30,
        learning_rate=3e-3,
        batch_tokens=256,
        heldout_fraction=0.15,
        checkpoint_every=1000,
        bfloat16=False,
    )
    weights = target.model
    lm_head, norm = weights.lm_head.weight.detach(), weights.final_norm.detach()
    eps = config.rms_norm_eps
    work = tmp_path_factory.mktemp("heads")
    medusa_heads, medusa_report = train_medusa(
        examples,
        medusa.MedusaConfig(config.hidden_size, config.vocab_size, 3),
        lm_head,
        norm,
        eps,
        settings,
        work / "medusa-work",
    )
    hydra_heads, hydra_report = train_hydra(
        examples,
        hydra.HydraConfig(config.hidden_size, config.vocab_size, 3),
        weights.embed.weight.detach(),
        lm_head,
        norm,
        eps,
        settings,
        work / "hydra-work",
    )
    assert medusa_report.agreement[0] > 0.5, medusa_report
    assert hydra_report.agreement[0] > 0.5, hydra_report
    medusa.save_heads(medusa_heads, lm_head, work / "medusa")
    hydra.save_heads(hydra_heads, work / "hydra")
    return {"medusa": str(work / "medusa"), "hydra": str(work / "hydra")}


@pytest.mark.parametrize("tree", ["chain", "dynamic"])
@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_heads_greedy_is_exact_with_drafts_accepted(small, plain, head_dirs, kind, tree) -> None:
    spec = SpecConfig(
        drafter=kind,
        drafter_options={"head": head_dirs[kind]},
        controller="heuristic",
        tree=tree,
        tree_width=2,
    )
    sampling = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)
    for prompt in PROMPTS:
        out, _, stats = small.engine.generate(small.encode_prompt(prompt), sampling, spec)
        assert out == plain[prompt], prompt
        assert stats.accepted_tokens >= TOKENS // 4, stats.summary()


def test_heads_are_refused_on_the_llamacpp_backend_in_one_line(head_dirs) -> None:
    pytest.importorskip("llama_cpp")
    from specdecode.errors import SpecDecodeError

    llm = SpecDecoder.load(SMALL, backend="llamacpp")
    for kind in ("medusa", "hydra"):
        with pytest.raises(SpecDecodeError, match="--backend torch"):
            llm.generate(
                "Hi",
                sampling=SamplingParams(max_new_tokens=4),
                spec=SpecConfig(drafter=kind, drafter_options={"head": head_dirs[kind]}),
            )


@pytest.mark.slow
@pytest.mark.parametrize(("tree", "verifier"), [("chain", "rejection"), ("dynamic", "specinfer")])
@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_heads_sampling_passes_certify_on_the_real_model(
    small, head_dirs, kind, tree, verifier
) -> None:
    """certify at temperature 1 with the heads' drafts, at the sample size and level of
    test_certify.py's real-model tests (which state the distance they detect: a total variation
    of 0.26 nine times in ten)."""
    from specdecode.certify import CertifyConfig, certify

    spec = SpecConfig(
        drafter=kind,
        drafter_options={"head": head_dirs[kind]},
        controller="heuristic",
        num_draft_tokens=2,
        tree=tree,
        tree_width=2,
        verifier=verifier,
    )
    report = certify(
        small.engine,
        small.encode_prompt(PROMPTS[0]),
        SamplingParams(temperature=1.0),
        spec,
        CertifyConfig(samples=150, length=2, alpha=1e-3),
    )
    assert report.passed, report.summary()
    assert report.speculative_tokens_per_forward > 1.0, report.summary()
