"""Statistical tests: speculative sampling must reproduce the target's distribution exactly.

Target and drafter are order-1 Markov models over a small vocabulary (tables of logits). A sequence
of `LENGTH` tokens is produced by repeated draft -> verify steps, exactly as the engine does it; the
histogram of sequences is compared with the target's exact joint distribution by a chi-square test.
Seeds are fixed, so the tests are deterministic (significance levels: `significance.py`).
Deliberately broken verifiers (a wrong residual, a wrong bonus token, rows off by one, a target not
truncated by top-k / top-p) must fail the same test: that is what shows it has power.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare
from significance import ALPHA, BROKEN

from specdecode.config import SamplingParams
from specdecode.sampling import sample_from, shaped_probs
from specdecode.tree import DraftTree
from specdecode.verify.base import Verdict
from specdecode.verify.rejection import RejectionVerifier
from specdecode.verify.traversal import TraversalVerifier

VOCAB = 4
LENGTH = 3
SAMPLES = 16_000


def markov_table(seed: int, sharpness: float) -> torch.Tensor:  # [V, V] logits[prev, next]
    return torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * sharpness


def exact_joint(target_logits: torch.Tensor, sampling: SamplingParams, root: int) -> torch.Tensor:
    """Probability of every length-LENGTH sequence under the shaped target. [V**LENGTH]"""
    transition = shaped_probs(target_logits, sampling)  # [V, V]
    probs = []
    for seq in itertools.product(range(VOCAB), repeat=LENGTH):
        prob, prev = 1.0, root
        for token in seq:
            prob *= float(transition[prev, token])
            prev = token
        probs.append(prob)
    return torch.tensor(probs, dtype=torch.float64)


def speculative_histogram(
    verifier, target_logits, draft_logits, sampling, draft_len, point_mass=False, seed=0, root=0
) -> torch.Tensor:
    """Counts of each length-LENGTH sequence over SAMPLES speculative generations."""
    rng = torch.Generator().manual_seed(seed)
    draft_probs_table = shaped_probs(draft_logits, sampling)  # [V, V]
    counts = torch.zeros(VOCAB**LENGTH, dtype=torch.float64)
    for _ in range(SAMPLES):
        seq = [root]
        while len(seq) <= LENGTH:
            drafts, rows = [], []
            prev = seq[-1]
            for _ in range(draft_len):
                if point_mass:  # a deterministic drafter: the draft's argmax, no draft_probs
                    token = int(draft_logits[prev].argmax())
                else:
                    rows.append(draft_probs_table[prev])
                    token = int(sample_from(draft_probs_table[prev], rng))
                drafts.append(token)
                prev = token
            chain = [seq[-1]] + drafts
            tree = DraftTree.chain(drafts, None if point_mass else torch.stack(rows))
            verdict = verifier.verify(tree, target_logits[chain], sampling, rng)
            seq.extend(verdict.tokens)
        index = 0
        for token in seq[1 : LENGTH + 1]:
            index = index * VOCAB + token
        counts[index] += 1
    return counts


def chi_square_pvalue(
    counts: torch.Tensor, expected_probs: torch.Tensor, impossible_is_zero: bool = False
) -> float:
    """p-value of the counts under the exact law. A sequence the target gives zero probability
    fails the assertion, or gives p = 0 with `impossible_is_zero` (for broken variants)."""
    expected = expected_probs * counts.sum()
    impossible = expected_probs == 0
    if impossible_is_zero and counts[impossible].sum() > 0:
        return 0.0
    assert counts[impossible].sum() == 0, "produced a sequence the target gives zero probability"
    # Pool the rare outcomes into one bin so the test is valid.
    common = expected >= 5
    observed = torch.cat([counts[common], counts[~common & ~impossible].sum().reshape(1)])
    wanted = torch.cat([expected[common], expected[~common & ~impossible].sum().reshape(1)])
    if wanted[-1] == 0:
        observed, wanted = observed[:-1], wanted[:-1]
    wanted = wanted * observed.sum() / wanted.sum()
    return float(chisquare(observed.numpy(), wanted.numpy()).pvalue)


CASES = {
    "random": dict(target_seed=1, target_sharp=1.5, draft_seed=2, draft_sharp=1.5, sampling={}),
    "near-degenerate target": dict(
        target_seed=3, target_sharp=8.0, draft_seed=4, draft_sharp=1.0, sampling={}
    ),
    "draft sharper than target": dict(
        target_seed=5, target_sharp=0.7, draft_seed=6, draft_sharp=4.0, sampling={}
    ),
    "temperature and top-k": dict(
        target_seed=7,
        target_sharp=2.0,
        draft_seed=8,
        draft_sharp=2.0,
        sampling={"temperature": 0.7, "top_k": 3},
    ),
    "top-p": dict(
        target_seed=9,
        target_sharp=2.0,
        draft_seed=10,
        draft_sharp=1.0,
        sampling={"temperature": 1.3, "top_p": 0.8},
    ),
}


def run_case(
    verifier, case: dict, draft_len: int, point_mass: bool = False, broken: bool = False
) -> float:
    sampling = (
        SamplingParams(temperature=1.0, **case["sampling"])
        if "temperature" not in case["sampling"]
        else SamplingParams(**case["sampling"])
    )
    target = markov_table(case["target_seed"], case["target_sharp"])
    draft = markov_table(case["draft_seed"], case["draft_sharp"])
    counts = speculative_histogram(verifier, target, draft, sampling, draft_len, point_mass)
    return chi_square_pvalue(counts, exact_joint(target, sampling, root=0), broken)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rejection_sampling_keeps_the_target_distribution(name: str) -> None:
    assert run_case(RejectionVerifier(), CASES[name], draft_len=2) > ALPHA


def test_point_mass_drafts_keep_the_target_distribution() -> None:
    assert run_case(RejectionVerifier(), CASES["random"], draft_len=3, point_mass=True) > ALPHA


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_verification_of_chains_keeps_the_target_distribution(name: str) -> None:
    """`traversal` on a chain is block verification: paths judged as a whole."""
    assert run_case(TraversalVerifier(), CASES[name], draft_len=2) > ALPHA


def test_block_verification_of_point_mass_chains_keeps_the_target_distribution() -> None:
    assert run_case(TraversalVerifier(), CASES["random"], draft_len=3, point_mass=True) > ALPHA


class SampledDraftAsPointMass(RejectionVerifier):
    """Ignores q and treats each sampled draft as a point mass: accept with p(x), else draw from p
    without x. Slower to accept, but still exact, and the test must say so."""

    def verify(self, tree, target_logits, sampling, rng) -> Verdict:
        return super().verify(DraftTree.chain(tree.tokens), target_logits, sampling, rng)


def test_ignoring_draft_probs_is_still_lossless() -> None:
    assert run_case(SampledDraftAsPointMass(), CASES["random"], draft_len=2) > ALPHA


# ---- deliberately broken verifiers: the same test must reject them ------------------------------


class ResidualIsTarget(RejectionVerifier):
    """Broken: after a rejection, draws from p instead of norm(max(p - q, 0))."""

    def verify(self, tree, target_logits, sampling, rng) -> Verdict:
        verdict = super().verify(tree, target_logits, sampling, rng)
        if verdict.bonus:
            return verdict
        probs = shaped_probs(target_logits[verdict.num_accepted], sampling)
        return Verdict(
            verdict.path,
            verdict.tokens[:-1] + [int(sample_from(probs, rng))],
            verdict.num_draft_nodes,
            False,
        )


class BonusFromDraft(RejectionVerifier):
    """Broken: on full acceptance, the bonus repeats the last draft's distribution."""

    def verify(self, tree, target_logits, sampling, rng) -> Verdict:
        verdict = super().verify(tree, target_logits, sampling, rng)
        if not verdict.bonus or tree.draft_probs is None:
            return verdict
        token = int(sample_from(tree.draft_probs[-1], rng))
        return Verdict(verdict.path, verdict.tokens[:-1] + [token], verdict.num_draft_nodes, True)


class TargetRowsShifted(RejectionVerifier):
    """Broken: compares draft i with the target's row i+1 (an off-by-one bug)."""

    def verify(self, tree, target_logits, sampling, rng) -> Verdict:
        shifted = torch.cat([target_logits[1:], target_logits[-1:]])
        return super().verify(tree, shifted, sampling, rng)


class BlockValueNotLowered(TraversalVerifier):
    """Broken: after a rejection the parent keeps its path value instead of r / (r + 1 - a)."""

    def verify(self, tree, target_logits, sampling, rng) -> Verdict:
        import specdecode.verify.traversal as module

        original = module._Traversal.reject

        def reject(walk, slot):
            parent = int(walk.tree.parents[slot - 1]) + 1
            kept = walk.value[parent]
            original(walk, slot)
            walk.value[parent] = kept

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(module._Traversal, "reject", reject)
            return super().verify(tree, target_logits, sampling, rng)


class DraftProbsMisreported(RejectionVerifier):
    """Broken drafter: it samples from its distribution but hands the verifier a uniform one as
    `draft_probs` (the drafter -> verifier contract says: the distribution it sampled from)."""

    def verify(self, tree, target_logits, sampling, rng) -> Verdict:
        uniform = torch.full_like(tree.draft_probs, 1.0 / tree.draft_probs.shape[-1])
        return super().verify(DraftTree.chain(tree.tokens, uniform), target_logits, sampling, rng)


@pytest.mark.parametrize(
    "broken",
    [
        ResidualIsTarget,
        BonusFromDraft,
        TargetRowsShifted,
        BlockValueNotLowered,
        DraftProbsMisreported,
    ],
)
def test_broken_verifiers_fail(broken) -> None:
    assert run_case(broken(), CASES["random"], draft_len=2, broken=True) < BROKEN


class TargetNotTruncated(RejectionVerifier):
    """Broken: the target's distribution gets the temperature but not top-k / top-p (the draft's
    does), so the output follows the untruncated target. Right at temperature 1 alone."""

    def verify(self, tree, target_logits, sampling, rng) -> Verdict:
        return super().verify(tree, target_logits, replace(sampling, top_k=0, top_p=1.0), rng)


@pytest.mark.parametrize("name", ["temperature and top-k", "top-p"])
def test_a_verifier_that_ignores_top_k_or_top_p_fails(name: str) -> None:
    # Without top-k / top-p this bug is invisible (it is the rejection verifier itself, which
    # passes the "random" case above): only these cases can catch it.
    assert run_case(TargetNotTruncated(), CASES[name], draft_len=2, broken=True) < BROKEN
