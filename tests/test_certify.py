"""`specdecode certify`: the two-sample test itself, every lossless verifier passing it on the toy
model, a deliberately broken verifier failing it, and the command on a real model."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch
from significance import ALPHA, BROKEN
from toy import ToyBackend, ToyTokenizer

from specdecode.certify import CertifyConfig, certify, homogeneity_test
from specdecode.cli import main
from specdecode.config import SamplingParams, SpecConfig
from specdecode.engine import Engine
from specdecode.errors import SpecDecodeError
from specdecode.verify import VERIFIERS
from specdecode.verify.rejection import RejectionVerifier
from specdecode.verify.specinfer import SpecInferVerifier


def test_homogeneity_test_separates_equal_from_different_laws() -> None:
    rng = torch.Generator().manual_seed(0)
    law = torch.tensor([0.5, 0.3, 0.15, 0.05])
    other = torch.tensor([0.4, 0.4, 0.15, 0.05])

    def sample(probs: torch.Tensor) -> Counter:
        return Counter(torch.multinomial(probs, 4000, True, generator=rng).tolist())

    # Bounds with room for chance (significance.py): the plug-in TV of 4000 draws per side has a
    # standard deviation near 0.01 here, so the margins below are about five of them.
    same = homogeneity_test(sample(law), sample(law), rng)
    assert same.p_value > ALPHA and same.dof == 3
    assert same.tv_distance < 0.05 and same.tv_low <= same.tv_high
    different = homogeneity_test(sample(law), sample(other), rng)
    assert different.p_value < BROKEN
    assert abs(different.tv_distance - 0.1) < 0.05  # the true TV distance is 0.1
    assert different.tv_low < different.tv_distance < different.tv_high + 0.05
    assert different.tv_distance > different.tv_same_law
    # A single outcome in both samples: nothing to test, and no false alarm.
    assert homogeneity_test(Counter({(1,): 50}), Counter({(1,): 50})).p_value == 1.0


def toy_engine() -> Engine:
    return Engine(
        ToyBackend(sharpness=1.0), ToyTokenizer(), draft_model=ToyBackend(seed=5, sharpness=1.0)
    )


CONFIG = CertifyConfig(samples=4000, length=2, alpha=ALPHA)
SAMPLING = SamplingParams(temperature=1.0)
LOSSLESS = {
    "rejection": SpecConfig(drafter="draft-model", controller="heuristic", num_draft_tokens=2),
    "traversal-chain": SpecConfig(
        drafter="draft-model", controller="heuristic", num_draft_tokens=2, verifier="traversal"
    ),
    "specinfer": SpecConfig(drafter="draft-model", tree="iid", tree_width=3, num_draft_tokens=2),
    "spectr": SpecConfig(
        drafter="draft-model", tree="iid", tree_width=3, num_draft_tokens=2, verifier="spectr"
    ),
    "rrs-without-replacement": SpecConfig(
        drafter="draft-model", tree="without-replacement", tree_width=3, num_draft_tokens=2
    ),
    "traversal": SpecConfig(
        drafter="draft-model",
        tree="without-replacement",
        tree_width=3,
        num_draft_tokens=2,
        verifier="traversal",
    ),
    "prompt-lookup": SpecConfig(
        drafter="prompt-lookup", controller="heuristic", num_draft_tokens=2
    ),
    # Drafts cut by their forecasts (context only: lossless for point-mass drafts).
    "prompt-lookup-cost-aware": SpecConfig(
        drafter="prompt-lookup", controller="cost-aware", num_draft_tokens=2
    ),
}


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_verifiers_pass_certify(name: str) -> None:
    report = certify(toy_engine(), [1, 2, 3, 1, 2], SAMPLING, LOSSLESS[name], CONFIG)
    assert report.passed, report.summary()
    assert report.lossless_claimed
    assert report.speculative_tokens_per_forward > 1.05  # drafts were accepted: not vacuous


class _NoResidual(SpecInferVerifier):
    """Broken: after a rejection the recovered token is drawn from the target itself."""

    name = "broken-no-residual"

    def verify(self, tree, target_logits, sampling, rng):
        import specdecode.verify.specinfer as module

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(module, "residual", lambda probs, proposal: probs)
            return super().verify(tree, target_logits, sampling, rng)


def test_a_broken_verifier_fails_certify(monkeypatch) -> None:
    monkeypatch.setitem(VERIFIERS, _NoResidual.name, _NoResidual)
    spec = SpecConfig(drafter="draft-model", num_draft_tokens=2, verifier=_NoResidual.name)
    report = certify(toy_engine(), [1, 2, 3, 1, 2], SAMPLING, spec, CONFIG)
    assert not report.passed, report.summary()
    assert report.test.p_value < BROKEN


def test_cutting_sampled_drafts_by_their_own_draws_fails_certify(monkeypatch) -> None:
    """Why controllers leave sampled drafts whole: keeping a draft only when its own draw was
    likely (here: its draft probability above 0.1) changes the output distribution."""
    from specdecode import control
    from specdecode.control.fixed import FixedController

    class CutsByDraw(FixedController):
        name = "cuts-by-draw"

        def shorten(self, tree):
            first = tree.draft_probs[0, tree.tokens[0]] if tree.num_nodes else 0.0
            return tree.prefix(tree.num_nodes if first > 0.1 else 0)

    monkeypatch.setitem(control.CONTROLLERS, CutsByDraw.name, CutsByDraw)
    spec = SpecConfig(drafter="draft-model", num_draft_tokens=2, controller=CutsByDraw.name)
    report = certify(toy_engine(), [1, 2, 3, 1, 2], SAMPLING, spec, CONFIG)
    assert report.speculative_tokens_per_forward > 1.05  # drafts were kept and accepted
    assert not report.passed, report.summary()
    assert report.test.p_value < BROKEN


def test_a_lossy_verifier_is_reported_lossy() -> None:
    spec = SpecConfig(
        drafter="draft-model", tree="static", num_draft_tokens=2, verifier="lossy-typical"
    )
    report = certify(toy_engine(), [1, 2, 3, 1, 2], SAMPLING, spec, CONFIG)
    assert not report.lossless_claimed
    assert "lossy by design" in report.summary()
    assert not report.passed, report.summary()  # and the test sees it on this toy model


def test_bad_certify_settings_fail() -> None:
    with pytest.raises(SpecDecodeError, match="at least 50"):
        CertifyConfig(samples=3)
    with pytest.raises(SpecDecodeError, match="alpha"):
        CertifyConfig(alpha=2.0)


DRAFT_MODEL = ["--draft-model", "qwen2.5-coder-0.5b-instruct", "--num-draft-tokens", "2"]
REAL = {
    "prompt-lookup/rejection": ["--drafter", "prompt-lookup"],
    # A draft that scores 256 tokens and those it was fed: zero draft mass on most of what the
    # target may say, which the residual distribution must cover.
    "draft-model-256-tokens/rejection": [*DRAFT_MODEL, "--draft-vocabulary", "256"],
    "iid/specinfer": [*DRAFT_MODEL, "--tree", "iid", "--tree-width", "3"],
    "iid/spectr": [*DRAFT_MODEL, "--tree", "iid", "--tree-width", "3", "--verifier", "spectr"],
    "without-replacement/rrs": [*DRAFT_MODEL, "--tree", "without-replacement", "--tree-width", "3"],
    "without-replacement/traversal": [
        *DRAFT_MODEL,
        "--tree",
        "without-replacement",
        "--tree-width",
        "3",
        "--verifier",
        "traversal",
    ],
}


# The command on a real model, 150 continuations per side at level 1e-3: on a law shaped like
# these continuations (a dozen outcomes, probabilities 0.3 down to 0.01) the chi-square test
# rejects a total-variation distance of 0.19 half the time, 0.26 nine times in ten and 0.32
# almost always; smaller errors pass. So these are end-to-end checks of the command on a real
# model that catch gross errors (the negative control below is one); the power against subtle
# ones is in the toy-model tests above (4000 samples: 0.06 half the time, 0.09 always) and in
# test_rejection_sampling.py / test_trees.py (exact laws). Slow tier: minutes each.
REAL_SAMPLES = "150"
REAL_ALPHA = "1e-3"


@pytest.mark.slow
@pytest.mark.parametrize("flags", list(REAL.values()), ids=list(REAL))
def test_certify_command_passes_on_the_real_model(flags, capsys) -> None:
    """The 0.5B model drafting for itself (int8 draft weights) is a near-miss drafter: most
    drafts are accepted, a few rejected, and the sample must still match plain sampling."""
    code = main(
        ["certify", "--samples", REAL_SAMPLES, "--length", "2", "--alpha", REAL_ALPHA, *flags]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("PASS") and "p-value" in out and "total-variation" in out
    assert "no drafted token was accepted" not in out


class _ArgmaxCorrection(RejectionVerifier):
    """Broken: the recovered or bonus token of each step is the target's likeliest instead of a
    draw, which narrows the output's distribution."""

    name = "broken-argmax-correction"

    def verify(self, tree, target_logits, sampling, rng):
        verdict = super().verify(tree, target_logits, sampling, rng)
        correction = int(target_logits[verdict.num_accepted].argmax())
        return replace(verdict, tokens=[*verdict.tokens[:-1], correction])


@pytest.mark.slow
def test_certify_command_fails_a_broken_verifier_on_the_real_model(capsys, monkeypatch) -> None:
    """The negative control of the test above, at its sample size and level."""
    monkeypatch.setitem(VERIFIERS, _ArgmaxCorrection.name, _ArgmaxCorrection)
    flags = ["--drafter", "prompt-lookup", "--verifier", _ArgmaxCorrection.name]
    code = main(
        ["certify", "--samples", REAL_SAMPLES, "--length", "2", "--alpha", REAL_ALPHA, *flags]
    )
    out = capsys.readouterr().out
    assert code == 1, out
    assert out.startswith("FAIL"), out
