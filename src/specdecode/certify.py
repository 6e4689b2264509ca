"""Losslessness check: does speculative sampling produce the target model's own distribution?

`certify` draws many short continuations of one fixed context twice, speculatively (with the
drafter, tree and verifier under test) and autoregressively (drafter `none`, the same engine and
sampling), and compares the two samples:
- a chi-square test of homogeneity on the 2 x K table of continuation counts (continuations too
  rare in either sample for the test's approximation are pooled into one column), with its
  p-value: the test *fails* when the p-value is below `alpha`;
- the total-variation distance between the two empirical distributions, with a bootstrap
  confidence interval (TV of two finite samples is above 0 even for identical laws; the interval
  says how far apart the laws may be).

A failure is evidence against losslessness at level `alpha`; a pass says the difference, if any,
is below what this many samples can see. Lossy verifiers are tested the same way and flagged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from specdecode.config import SamplingParams, SpecConfig
from specdecode.engine import Engine, verifier_name
from specdecode.errors import SpecDecodeError
from specdecode.trees import CHAIN, make_tree_shape
from specdecode.verify import make_verifier

_MIN_EXPECTED = 5.0  # the usual validity condition of the chi-square approximation
_BOOTSTRAP_ROUNDS = 1000


@dataclass(frozen=True)
class CertifyConfig:
    samples: int = 2000  # continuations drawn by each method
    length: int = 2  # tokens per continuation
    alpha: float = 0.01  # the test fails below this p-value
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 50:
            raise SpecDecodeError(f"--samples must be at least 50, got {self.samples}")
        if self.length < 1:
            raise SpecDecodeError(f"--length must be at least 1, got {self.length}")
        if not 0.0 < self.alpha < 1.0:
            raise SpecDecodeError(f"--alpha must be between 0 and 1, got {self.alpha}")


@dataclass(frozen=True)
class HomogeneityTest:
    statistic: float
    dof: int
    p_value: float
    tv_distance: float
    tv_low: float  # 95% bootstrap interval of the TV distance
    tv_high: float
    tv_same_law: float  # TV that two samples of one law reach 95% of the time at these sizes
    columns: int  # distinct continuations after pooling
    pooled_share: float  # of all continuations, those pooled as too rare to test alone

    @property
    def conclusive(self) -> bool:
        """Whether most of the sample was tested outcome by outcome (else the continuations are
        too spread for this many samples: fewer tokens or more samples)."""
        return self.columns >= 2 and self.pooled_share <= 0.5


@dataclass(frozen=True)
class CertifyReport:
    verifier: str
    lossless_claimed: bool
    samples: int
    length: int
    alpha: float
    test: HomogeneityTest
    speculative_tokens_per_forward: float

    @property
    def passed(self) -> bool:
        return self.test.conclusive and self.test.p_value >= self.alpha

    @property
    def verdict(self) -> str:
        if not self.test.conclusive:
            return "INCONCLUSIVE"
        return "PASS" if self.passed else "FAIL"

    def summary(self) -> str:
        test = self.test
        lines = [
            f"{self.verdict}: {self.verifier} vs plain sampling, {self.samples} continuations of "
            f"{self.length} token(s) each",
            f"  chi-square {test.statistic:.2f} on {test.dof} degrees of freedom, p-value "
            f"{test.p_value:.4g} (fails below {self.alpha})",
            f"  total-variation distance {test.tv_distance:.4f} "
            f"(95% bootstrap interval {test.tv_low:.4f} .. {test.tv_high:.4f}; two samples of "
            f"one law this size differ by up to {test.tv_same_law:.4f})",
            f"  speculation: {self.speculative_tokens_per_forward:.2f} tokens per target forward",
        ]
        if not test.conclusive:
            lines.append(
                f"  note: {test.pooled_share:.0%} of the continuations were too rare to test one "
                "by one; use a shorter --length or more --samples"
            )
        if self.speculative_tokens_per_forward <= 1.0:
            lines.append(
                "  note: no drafted token was accepted, so this says nothing about the verifier; "
                "use a context the drafter can continue (prompt lookup needs repeated text)"
            )
        if not self.lossless_claimed:
            lines.append(
                f"  note: {self.verifier!r} is lossy by design"
                + ("; this sample size did not show it" if self.passed else "")
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        out["verdict"] = self.verdict
        return out


def homogeneity_test(
    first: Counter, second: Counter, rng: torch.Generator | None = None
) -> HomogeneityTest:
    """Chi-square test that two samples of outcomes come from one distribution, and the TV
    distance between them, both on the table after pooling rare outcomes into one column. (The
    plug-in TV of sparse outcomes is mostly sampling noise; pooling can only lower the true
    distance, and a table that is mostly pooled is reported as inconclusive.)"""
    outcomes = sorted(set(first) | set(second))
    counts = torch.tensor(
        [[first[o] for o in outcomes], [second[o] for o in outcomes]], dtype=torch.float64
    )  # [2, K]
    totals = counts.sum(1, keepdim=True)  # [2, 1]
    expected = totals * counts.sum(0, keepdim=True) / counts.sum()  # [2, K]
    rare = (expected < _MIN_EXPECTED).any(0)  # [K]
    table = counts[:, ~rare]
    if bool(rare.any()):
        table = torch.cat([table, counts[:, rare].sum(1, keepdim=True)], dim=1)
    pooled_share = float(counts[:, rare].sum() / counts.sum())
    tv = float(_tv(table))
    tv_low, tv_high = _bootstrap_tv(table, rng)
    noise = _same_law_tv(table, rng)
    columns = table.shape[1]
    if columns < 2:  # nothing the test can tell apart
        return HomogeneityTest(0.0, 0, 1.0, tv, tv_low, tv_high, noise, columns, pooled_share)
    expected = totals * table.sum(0, keepdim=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    dof = columns - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2)))
    return HomogeneityTest(
        statistic, dof, p_value, tv, tv_low, tv_high, noise, columns, pooled_share
    )


def _tv(counts: torch.Tensor) -> torch.Tensor:  # counts [..., 2, K] -> [...]
    freqs = counts / counts.sum(-1, keepdim=True)
    return 0.5 * (freqs[..., 0, :] - freqs[..., 1, :]).abs().sum(-1)


def _resample(probs: torch.Tensor, total: int, rng: torch.Generator | None) -> torch.Tensor:
    """_BOOTSTRAP_ROUNDS multinomial count vectors of `total` draws from `probs` [K]: each is
    a chain of binomial draws (memory independent of `total`)."""
    counts = torch.zeros(_BOOTSTRAP_ROUNDS, probs.shape[0], dtype=torch.float64)
    left = torch.full((_BOOTSTRAP_ROUNDS,), float(total), dtype=torch.float64)
    mass_left = 1.0
    for k in range(probs.shape[0] - 1):
        share = min(1.0, float(probs[k]) / mass_left) if mass_left > 0 else 0.0
        drawn = torch.binomial(left, torch.full_like(left, share), generator=rng)
        counts[:, k] = drawn
        left -= drawn
        mass_left -= float(probs[k])
    counts[:, -1] = left
    return counts


def _bootstrap_tv(counts: torch.Tensor, rng: torch.Generator | None) -> tuple[float, float]:
    """A 95% interval for the TV distance between the two laws: the basic bootstrap over
    multinomial resamples of each sample. (Resampled TVs sit above the sample's, as the sample's
    sits above the truth; reflecting the quantiles around the sample's TV corrects that bias.)"""
    rows = [_resample(row / row.sum(), int(row.sum()), rng) for row in counts]
    tvs = _tv(torch.stack(rows, dim=1))  # [rounds]
    low, high = torch.quantile(tvs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    sample_tv = float(_tv(counts))
    return max(0.0, 2 * sample_tv - high), max(0.0, 2 * sample_tv - low)


def _same_law_tv(counts: torch.Tensor, rng: torch.Generator | None) -> float:
    """The 95th percentile of the TV distance between two samples of these sizes drawn from one
    law (the pooled one): how far apart lossless results can look at this sample size."""
    pooled = counts.sum(0) / counts.sum()
    rows = [_resample(pooled, int(row.sum()), rng) for row in counts]
    return float(torch.quantile(_tv(torch.stack(rows, dim=1)), 0.95))


def sample_continuations(
    engine: Engine,
    prompt_ids: Sequence[int],
    sampling: SamplingParams,
    spec: SpecConfig,
    samples: int,
    seed: int,
    on_sample: Callable[[], None] | None = None,
) -> tuple[Counter, float]:
    """Counts of each continuation over `samples` generations, and tokens per target forward."""
    counts: Counter = Counter()
    emitted = forwards = 0
    for index in range(samples):
        # One seed per draw so that a run is reproducible and the draws are independent.
        token_ids, _, stats = engine.generate(
            prompt_ids, replace(sampling, seed=seed + index), spec
        )
        counts[tuple(token_ids)] += 1
        emitted += stats.emitted_tokens
        forwards += stats.target_forwards
        if on_sample is not None:
            on_sample()
    return counts, emitted / max(forwards, 1)


def certify(
    engine: Engine,
    prompt_ids: Sequence[int],
    sampling: SamplingParams,
    spec: SpecConfig,
    config: CertifyConfig,
    on_sample: Callable[[], None] | None = None,
) -> CertifyReport:
    """Sample `config.samples` continuations both ways and test that they agree."""
    if sampling.greedy:
        raise SpecDecodeError(
            "certify compares distributions: give --temperature above 0 (at 0 every verifier "
            "must give plain greedy decoding's tokens, which the tests check token for token)"
        )
    sampling = replace(sampling, max_new_tokens=config.length, ignore_eos=True, stop=())
    shape = None if spec.tree == CHAIN else make_tree_shape(spec.tree, spec.tree_options)
    verifier = make_verifier(verifier_name(spec, sampling, shape))
    # Seeds of the two samples never overlap, so they are independent draws.
    speculative, tokens_per_forward = sample_continuations(
        engine,
        prompt_ids,
        sampling,
        spec,
        config.samples,
        2 * config.seed * config.samples,
        on_sample,
    )
    plain, _ = sample_continuations(
        engine,
        prompt_ids,
        sampling,
        SpecConfig(drafter="none"),
        config.samples,
        (2 * config.seed + 1) * config.samples,
        on_sample,
    )
    test = homogeneity_test(speculative, plain, torch.Generator().manual_seed(config.seed))
    return CertifyReport(
        verifier.name,
        verifier.lossless,
        config.samples,
        config.length,
        config.alpha,
        test,
        tokens_per_forward,
    )
