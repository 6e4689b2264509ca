"""Draft lengths for a batch of sequences that maximise goodput: expected tokens per second of
batch time (SmartSpec, "Optimizing Speculative Decoding for Serving Large Language Models Using
Goodput", Liu et al. 2024; TurboSpec).

One verification forward serves every running sequence. Sequence i, drafting k_i tokens, emits in
expectation 1 + a_i + a_i^2 + ... + a_i^k_i tokens (the target's own token, then each draft if all
before it were accepted; a_i is its chance of acceptance given its parent's, Leviathan et al. §3),
and the step costs forward(R) + sum_i draft_i(k_i) seconds, where R = sum_i rows_i(k_i) is the
forward's rows and forward(R) is measured on this machine (`cost_curve.py`). The plan starts from no
drafts (plain decoding of the whole batch) and adds drafts one at a time, each to the sequence whose
next draft is likeliest to be accepted; of the plans on that path it keeps the one with the most
tokens per second, if it promises at least `MIN_GAIN` more than no drafts. Where no draft pays (a
batch whose forward is already compute-bound, drafts that are rarely accepted), the plan is no
drafts at all: speculation turns itself off under load, and the batch runs as fast as without it.

a_i is estimated from the sequence's own verdicts: accepted drafts over drafts the verifier reached
(the maximum-likelihood estimate of a geometric run), shrunk towards `PRIOR_ACCEPTANCE` by
`PRIOR_WEIGHT` pseudo-drafts so that a new sequence starts from a guess, not from nothing.

The plan only sizes drafts; what is emitted is the verifier's business, so it cannot change output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from specdecode.errors import SpecDecodeError

PRIOR_ACCEPTANCE = 0.5
PRIOR_WEIGHT = 2.0
#: How much faster than plain decoding of the batch a plan must promise before any draft is made:
#: the costs are measured on an idle machine and the acceptance is an estimate, so a promise of a
#: few percent is within their error (measured before this margin, at eight streams of the 1.5B:
#: speculation ran 1.01x and 0.91x the same server without it in two runs).
MIN_GAIN = 0.05


@dataclass(frozen=True)
class Outlook:
    """What the planner knows of one running sequence."""

    acceptance: float  # chance that a draft is accepted, given its parent was
    max_drafts: int  # the deepest draft it may get (its token limit, its configuration)
    rows_per_draft: int = 1  # forward rows per level of drafts (a tree's width)
    draft_seconds: float = 0.0  # drafting time per drafted token (0 for model-free drafters)

    def __post_init__(self) -> None:
        if not 0.0 <= self.acceptance <= 1.0:
            raise SpecDecodeError(f"acceptance must be in [0, 1], got {self.acceptance}")
        if self.max_drafts < 0 or self.rows_per_draft < 1 or self.draft_seconds < 0:
            raise SpecDecodeError(f"malformed outlook {self}")

    @classmethod
    def from_history(
        cls,
        accepted: int,
        reached: int,
        max_drafts: int,
        rows_per_draft: int = 1,
        draft_seconds: float = 0.0,
    ) -> Outlook:
        """From a sequence's counts: drafts accepted, and drafts the verifier reached (drafted
        with their parent accepted)."""
        acceptance = (accepted + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (reached + PRIOR_WEIGHT)
        return cls(min(1.0, acceptance), max_drafts, rows_per_draft, draft_seconds)


def plan_draft_lengths(
    outlooks: Sequence[Outlook], forward_seconds: Callable[[int], float]
) -> list[int]:
    """The draft length of each sequence for the next step (see the module docstring);
    `forward_seconds(rows)` is what a verification forward over that many rows costs."""
    lengths = [0] * len(outlooks)
    if not outlooks:
        return lengths
    rows = len(outlooks)  # each sequence's root
    tokens = tokens_plain = float(len(outlooks))  # each step emits the target's own token
    drafting = 0.0
    best_rate, best = tokens / forward_seconds(rows), list(lengths)
    # The marginal gain of each sequence's next draft (a^(k+1)) falls with k, so adding the best
    # one at a time visits, for each number of drafts, the plan with the most expected tokens.
    gains = [o.acceptance if o.max_drafts > 0 else 0.0 for o in outlooks]
    while True:
        pick = max(range(len(outlooks)), key=gains.__getitem__)
        if gains[pick] <= 0.0:
            break
        outlook = outlooks[pick]
        tokens += gains[pick]
        rows += outlook.rows_per_draft
        drafting += outlook.draft_seconds
        lengths[pick] += 1
        more = lengths[pick] < outlook.max_drafts
        gains[pick] = gains[pick] * outlook.acceptance if more else 0.0
        rate = tokens / (forward_seconds(rows) + drafting)
        if rate > best_rate:
            best_rate, best = rate, list(lengths)
    if best_rate < (1 + MIN_GAIN) * tokens_plain / forward_seconds(len(outlooks)):
        return [0] * len(outlooks)
    return best


def interpolated(seconds_by_rows: dict[int, float]) -> Callable[[int], float]:
    """A cost function from measured points: linear between them, and beyond the largest at its
    cost per row (a forward that large is compute-bound)."""
    if not seconds_by_rows:
        raise SpecDecodeError("no measured forward costs to plan from")
    points = sorted(seconds_by_rows.items())

    def cost(rows: int) -> float:
        if rows <= points[0][0]:
            return points[0][1]
        for (low, low_s), (high, high_s) in zip(points, points[1:], strict=False):
            if rows <= high:
                return low_s + (high_s - low_s) * (rows - low) / (high - low)
        top, top_s = points[-1]
        return top_s * rows / top

    return cost
