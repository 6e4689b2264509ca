"""Which layers a self-speculative draft skips: a score of a plan on text, and a search for one.

`PlanScorer` measures a plan by its drafts' agreement with the full model, SWIFT's "matchness"
(Xia et al., ICLR 2025): a window of committed tokens is fed again through the plan, in one
forward after the cache, each token seeing the committed tokens before it (the full model's cache
rows, as a first draft does) and itself; the score is the fraction of them after which the plan's
argmax is the full model's, plus a hundredth of the mean probability the plan gives the full
model's argmax (which breaks ties). The cache is cut back afterwards.

`SkipSearch` looks for the best set of a fixed number of sublayers to skip. Attention and MLP
sublayers are chosen separately (both papers find attention far more dispensable than MLP) and
the first and last layers are always kept, as in SWIFT. It starts from SWIFT's point, both
sublayers of the odd layers, and then tries the best set so far with one or two of its skipped
sublayers exchanged for kept ones, keeping a candidate only if it scores higher. SWIFT proposes
uniformly random sets, with a Bayesian step every 25th; with the few tries a CPU can afford per
request, a local step from the best set finds better sets sooner.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from specdecode.backends.base import Backend, LayerPlan
from specdecode.errors import SpecDecodeError

#: A sublayer is `2 * layer` (its attention) or `2 * layer + 1` (its MLP).
ATTENTION, MLP = 0, 1


def plan_of(sublayers: Sequence[int]) -> LayerPlan:
    """The plan that skips `sublayers` (see ATTENTION, MLP)."""
    return LayerPlan(
        skip_attention=frozenset(s // 2 for s in sublayers if s % 2 == ATTENTION),
        skip_mlp=frozenset(s // 2 for s in sublayers if s % 2 == MLP),
    )


def skip_count(num_layers: int, skip_ratio: float) -> int:
    """How many sublayers a ratio skips: of the 2 (L - 2) the search may choose from."""
    if not 0.0 < skip_ratio < 1.0:
        raise SpecDecodeError(f"the skip ratio must be between 0 and 1, got {skip_ratio}")
    if num_layers < 3:
        raise SpecDecodeError(f"a model of {num_layers} layers has no middle layers to skip")
    return max(1, round(2 * (num_layers - 2) * skip_ratio))


class PlanScorer:
    """Scores plans on one window of a context (see the module docstring)."""

    def __init__(self, target: Backend, context: Sequence[int], start: int, count: int) -> None:
        """The window: the tokens at positions start ... start + count - 1, all cached, the next
        token after each being known (`context` holds them)."""
        if count < 1 or start < 1 or start + count > target.num_cached:
            raise SpecDecodeError(
                f"a scoring window of {count} tokens from position {start} needs them cached "
                f"after at least one token ({target.num_cached} are)"
            )
        if target.num_cached + count > target.max_context:
            raise SpecDecodeError("the scoring window does not fit the context after the cache")
        self.target = target
        self.tokens = torch.as_tensor(list(context[start : start + count]), dtype=torch.long)
        self.positions = torch.arange(start, start + count)
        # [count, trailing + count]: the cached slots from `start` on, then the new rows; row i
        # sees the cached slots before its own position and its own new row.
        trailing = target.num_cached - start
        earlier = torch.zeros(count, trailing, dtype=torch.bool)
        earlier[:, :count] = torch.ones(count, count, dtype=torch.bool).tril_(-1)
        self.mask = torch.cat([earlier, torch.eye(count, dtype=torch.bool)], dim=1)
        self.reference = self._logits(LayerPlan()).argmax(dim=-1)  # [count]: the full model's

    def _logits(self, plan: LayerPlan) -> torch.Tensor:  # [count, V]
        committed = self.target.num_cached
        try:
            return self.target.forward_partial(self.tokens, plan, self.positions, self.mask)
        finally:
            self.target.truncate(committed)

    def score(self, plan: LayerPlan) -> float:
        logits = self._logits(plan)
        agreed = (logits.argmax(dim=-1) == self.reference).float().mean()
        probs = torch.softmax(logits, dim=-1).gather(1, self.reference[:, None]).mean()
        return float(agreed + 0.01 * probs)


@dataclass
class SkipSearch:
    """A local search over sets of `count` skipped sublayers (see the module docstring)."""

    num_layers: int
    count: int
    seed: int = 0
    #: Which kinds of sublayer may be skipped (ATTENTION, MLP).
    kinds: tuple[int, ...] = (ATTENTION, MLP)

    def __post_init__(self) -> None:
        # The first and last layers' sublayers are never skipped.
        self.choices = [s for s in range(2, 2 * (self.num_layers - 1)) if s % 2 in self.kinds]
        if not 1 <= self.count <= len(self.choices):
            raise SpecDecodeError(
                f"cannot skip {self.count} sublayers of a {self.num_layers}-layer model "
                f"(between 1 and {len(self.choices)})"
            )
        odd = [s for s in self.choices if (s // 2) % 2 == 1]
        even_attention = [s for s in self.choices if (s // 2) % 2 == 0 and s % 2 == ATTENTION]
        rest = [s for s in self.choices if s not in odd and s not in even_attention]
        self.best = sorted((odd + even_attention + rest)[: self.count])
        self.best_score: float | None = None
        self.tries = 0
        self.since_best = 0
        self._rng = random.Random(self.seed)

    @property
    def best_plan(self) -> LayerPlan:
        return plan_of(self.best)

    def candidate(self) -> list[int]:
        """The best set with one or two skipped sublayers exchanged for kept ones (the best set
        itself until it has a score)."""
        if self.best_score is None:
            return list(self.best)
        kept = [s for s in self.choices if s not in self.best]
        swaps = min(self._rng.choice((1, 2)), len(kept), len(self.best))
        if swaps == 0:
            return list(self.best)
        dropped = set(self._rng.sample(self.best, swaps))
        added = self._rng.sample(kept, swaps)
        return sorted([s for s in self.best if s not in dropped] + added)

    def report(self, sublayers: Sequence[int], score: float) -> bool:
        """Record a scored set; True when it is the new best."""
        self.tries += 1
        if self.best_score is None and list(sublayers) == self.best:
            self.best_score = score
            return True
        if self.best_score is None or score > self.best_score:
            self.best, self.best_score, self.since_best = sorted(sublayers), score, 0
            return True
        self.since_best += 1
        return False

    def rescore_best(self, score: float) -> None:
        """The best set's score on a new window (scores on different windows do not compare)."""
        self.best_score = score


def save_plan(path: str | Path, plan: LayerPlan, meta: dict) -> None:
    """Write a skip set, with what it was found for (`meta`: model, layers, score, ...)."""
    record = {
        "skip_attention": sorted(plan.skip_attention),
        "skip_mlp": sorted(plan.skip_mlp),
        **meta,
    }
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(target)  # never a half-written file under the name


def read_plan_record(path: str | Path) -> tuple[LayerPlan, int]:
    """(the skip set, the layer count it was tuned for) of a `specdecode tune-skip` file."""
    try:
        record = json.loads(Path(path).read_text())
        plan = LayerPlan(
            skip_attention=frozenset(int(x) for x in record["skip_attention"]),
            skip_mlp=frozenset(int(x) for x in record["skip_mlp"]),
        )
        return plan, int(record["num_layers"])
    except OSError as exc:
        raise SpecDecodeError(f"cannot read the skip set {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SpecDecodeError(
            f"{path} is not a skip set written by `specdecode tune-skip`"
        ) from None


def load_plan(path: str | Path, num_layers: int) -> LayerPlan:
    """A skip set saved by `specdecode tune-skip`, checked against the model's layer count."""
    plan, saved_layers = read_plan_record(path)
    if saved_layers != num_layers:
        raise SpecDecodeError(
            f"the skip set {path} was tuned for a model of {saved_layers} layers, this one has "
            f"{num_layers}: run `specdecode tune-skip` for this model"
        )
    plan.check(num_layers)
    return plan
