"""The eagle drafter on a real model: the 0.5B with a head trained here, in about a minute, on the
model's own answers (so that its drafts are accepted), greedy output token-identical to plain
decoding on a chain and a dynamic tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from specdecode import SpecDecoder
from specdecode.config import SamplingParams, SpecConfig
from specdecode.heads.eagle3 import Eagle3Config, save_head
from specdecode.train.data import TrainingSequence
from specdecode.train.eagle import TrainSettings, train_eagle
from specdecode.train.features import FeatureStore

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
def head_dir(small: SpecDecoder, plain, tmp_path_factory):
    """A head trained on the model's answers to PROMPTS (a test of the machinery, not of the
    head's generality: the real recipe is `specdecode train-drafter`)."""
    work = tmp_path_factory.mktemp("eagle-real")
    sequences = []
    for prompt in PROMPTS:
        ids = small.encode_prompt(prompt)
        tokens = ids + plain[prompt]
        mask = [False] * (len(ids) - 1) + [True] * (len(tokens) - len(ids) + 1)
        sequences.append(TrainingSequence(tokens, mask, "test"))
    config = Eagle3Config.for_target(small.target.model_config, 1024, intermediate_size=256)
    store = FeatureStore(work / "features", config.aux_layers)
    store.compute(small.target, sequences)
    settings = TrainSettings(
        draft_vocab=1024,
        intermediate_size=256,
        epochs=40,
        learning_rate=3e-3,
        batch_tokens=256,
        heldout_fraction=0.15,
        checkpoint_every=1000,
        bfloat16=False,
    )
    model = small.target.model
    head, report = train_eagle(
        store.load(sequences * 4),  # held out: a copy
        config,
        model.embed.weight.detach(),
        model.lm_head.weight.detach(),
        model.final_norm.detach(),
        settings,
        work,
    )
    assert report.agreement[0] > 0.5, report
    save_head(head, work / "head")
    return work / "head"


@pytest.mark.parametrize("tree", ["chain", pytest.param("dynamic", marks=pytest.mark.slow)])
def test_eagle_greedy_is_exact_with_drafts_accepted(small, plain, head_dir, tree) -> None:
    spec = SpecConfig(
        drafter="eagle",
        drafter_options={"head": str(head_dir)},
        controller="heuristic",
        tree=tree,
        tree_width=2,
    )
    sampling = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)
    for prompt in PROMPTS:
        out, _, stats = small.engine.generate(small.encode_prompt(prompt), sampling, spec)
        assert out == plain[prompt], prompt
        assert stats.accepted_tokens >= TOKENS // 4, stats.summary()


def test_eagle_is_refused_on_the_llamacpp_backend_in_one_line(head_dir) -> None:
    pytest.importorskip("llama_cpp")
    from specdecode.errors import SpecDecodeError

    llm = SpecDecoder.load(SMALL, backend="llamacpp")
    with pytest.raises(SpecDecodeError, match="--backend torch"):
        llm.generate(
            "Hi",
            sampling=SamplingParams(max_new_tokens=4),
            spec=SpecConfig(drafter="eagle", drafter_options={"head": str(head_dir)}),
        )


@pytest.mark.slow
@pytest.mark.parametrize(("tree", "verifier"), [("chain", "rejection"), ("dynamic", "specinfer")])
def test_eagle_sampling_passes_certify_on_the_real_model(small, head_dir, tree, verifier) -> None:
    """certify at temperature 1 with the head's drafts, at the sample size and level of
    test_certify.py's real-model tests (which state the distance they detect: a total variation
    of 0.26 nine times in ten)."""
    from specdecode.certify import CertifyConfig, certify

    spec = SpecConfig(
        drafter="eagle",
        drafter_options={"head": str(head_dir)},
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


@pytest.mark.slow
def test_train_drafter_makes_a_head_and_reruns_from_its_cache(tmp_path, monkeypatch) -> None:
    """`specdecode train-drafter`'s whole path at a tiny recipe: the model's answers, their
    features, training and the saved head; run again, it reuses every answer and feature, and
    another kind of head reuses the answers."""
    from specdecode.heads.eagle3 import read_config
    from specdecode.heads.medusa import WEIGHTS_FILE
    from specdecode.train import command
    from specdecode.train.data import Recipe
    from specdecode.train.features import FeatureStore

    recipe = Recipe(
        stdlib_tokens=1500, distill_prompts=6, follow_ups=2, distill_max_tokens=16, distill_batch=3
    )
    settings = TrainSettings(draft_vocab=256, intermediate_size=128, epochs=1, batch_tokens=512)
    out, data = tmp_path / "head", tmp_path / "data"

    def train(kind: str, out: Path):
        return command.train_drafter(
            SMALL, kind, out, recipe=recipe, settings=settings, work_dir=data
        )

    first = train("eagle", out)
    config = read_config(out)
    assert config.draft_vocab_size <= 256 and (out / "model.safetensors").is_file()
    answers = (data / "distill.jsonl").read_text().splitlines()
    assert 6 <= len(answers) <= 8  # a follow-up whose prompt is too long is left out
    assert len(list((data / "features").iterdir())) == first.sequences
    assert len(first.report.agreement) == settings.ttt_steps

    def no_generation(*args, **kwargs):
        raise AssertionError("an answer was generated again")

    def no_features(self, target, sequences):
        assert all(self.path(s).is_file() for s in sequences), "features computed again"

    monkeypatch.setattr(command, "generate_answers", no_generation)
    with monkeypatch.context() as patched:
        patched.setattr(FeatureStore, "compute", no_features)
        again = train("eagle", out)
    assert (again.sequences, again.tokens) == (first.sequences, first.tokens)

    # Medusa reads another layer: its features are new, the answers are not.
    heads = train("medusa", tmp_path / "medusa")
    assert (heads.sequences, heads.tokens) == (first.sequences, first.tokens)
    assert (tmp_path / "medusa" / WEIGHTS_FILE).is_file()
    assert len(list((data / "features").iterdir())) == 2 * first.sequences
