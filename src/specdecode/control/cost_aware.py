"""Draft the number of tokens that maximises expected tokens per second, from measured costs.

A step that drafts k tokens emits, in expectation, 1 + sum_{i<=k} prod_{j<=i} a_j tokens, where a_j
is the chance that draft j is accepted once drafts 1..j-1 were (with a constant a this is Leviathan
et al.'s (1 - a^(k+1)) / (1 - a), "Fast Inference from Transformers via Speculative Decoding", §3).
It costs draft(k) + verify(k) seconds. Both sides are learned online from the engine's step
timings and verdicts, as exponential moving averages; the controller then picks
argmax_k expected_tokens(k) / seconds(k) over k = 0..maximum. k = 0 is plain decoding: where no
draft length pays (a slow drafter, a hard prompt, a backend whose multi-token forwards are
expensive), speculation turns itself off, and after `probe_every` such steps one short draft
checks whether it pays again. Each probe that fails doubles the wait for the next (up to
`MAX_PROBE_WAIT` steps), as a probe's draft is a cost where nothing can be drafted; any accepted
draft brings it back to `probe_every`.

The engine hands it the target's cost curve, measured once per model, backend and thread count
(`control/cost_curve.py`), so it plans from the first step. Lengths still unmeasured are treated
optimistically (the cost of the nearest shorter measured length,
the acceptance of the deepest measured position), so the controller tries longer drafts until it
has seen what they cost; and before settling on a length it measures the next shorter one once.
Losslessness does not depend on any of this: the controller only sizes the draft.
"""

from __future__ import annotations

from specdecode.control.base import Controller, StepTimings
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget
from specdecode.verify.base import Verdict

#: The most plain steps between two probes, however many have failed.
MAX_PROBE_WAIT = 64


class CostAwareController(Controller):
    name = "cost-aware"
    chains_only = True  # its costs and acceptance are per chain length
    uses_costs = True

    def __init__(
        self,
        initial: int,
        maximum: int,
        smoothing: float = 0.2,
        allow_plain: bool = True,
        probe_every: int = 8,
    ) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise SpecDecodeError(f"cost-aware smoothing must be in (0, 1], got {smoothing}")
        if probe_every < 1:
            raise SpecDecodeError(f"cost-aware probe_every must be >= 1, got {probe_every}")
        self.initial = initial
        self.maximum = maximum
        self.smoothing = smoothing
        self.allow_plain = allow_plain
        self.probe_every = probe_every
        # Kept across sequences: costs belong to the machine and model, not to a prompt.
        self.verify_seconds: dict[int, float] = {}  # draft length -> seconds of a target step
        self.draft_seconds_per_token: float | None = None
        self.reset()

    def reset(self) -> None:
        # Acceptance belongs to the prompt: start each sequence optimistic again.
        self.acceptance: list[float] = []  # [depth - 1] -> P(accept | all shallower accepted)
        self.length = self.initial
        self.plain_steps = 0
        self.probe_wait = self.probe_every
        self.probing = False  # a probe was asked for and has not drafted yet
        self.drafted_last = False

    def use_costs(self, verify_seconds: dict[int, float]) -> None:
        # A start-up measurement of the bare forward; the steps timed online (which include the
        # verifier) refine it.
        for length, seconds in verify_seconds.items():
            self.verify_seconds.setdefault(length, seconds)

    # ---- the model of a step -------------------------------------------------------------------

    def expected_tokens(self, length: int) -> float:
        total, reach = 1.0, 1.0
        for depth in range(length):
            reach *= self._acceptance_at(depth)
            total += reach
        return total

    def expected_seconds(self, length: int) -> float | None:
        verify = self._verify_cost(length)
        if verify is None:
            return None
        return verify + length * (self.draft_seconds_per_token or 0.0)

    def _acceptance_at(self, depth: int) -> float:
        if not self.acceptance:
            return 1.0
        return self.acceptance[min(depth, len(self.acceptance) - 1)]

    def _verify_cost(self, length: int) -> float | None:
        shorter = [k for k in self.verify_seconds if k <= length]
        if shorter:
            return self.verify_seconds[max(shorter)]
        longer = [k for k in self.verify_seconds if k > length]
        return self.verify_seconds[min(longer)] if longer else None

    def best_length(self) -> int:
        lowest = 0 if self.allow_plain else 1
        best, best_rate = self.length, 0.0
        for length in range(lowest, self.maximum + 1):
            seconds = self.expected_seconds(length)
            if seconds is None or seconds <= 0.0:
                return self.length  # nothing measured yet
            rate = self.expected_tokens(length) / seconds
            if rate > best_rate:
                best, best_rate = length, rate
        # A shorter length is only ever costed at the price of a longer measured one, which makes
        # it look no cheaper: measure the next shorter length once before settling.
        if best > lowest and best - 1 not in self.verify_seconds:
            return best - 1
        return best

    # ---- the controller contract ---------------------------------------------------------------

    def budget(self) -> Budget:
        return Budget.chain(self.length)

    def observe(self, verdict: Verdict, timings: StepTimings | None = None) -> None:
        drafted = verdict.num_draft_nodes
        if timings is not None:
            self._average_into(self.verify_seconds, drafted, timings.verifying)
            # A draft after a step without one includes the draft model catching up on the
            # tokens it skipped (at a sequence's start, the whole prompt): a cost of resuming,
            # not of drafting, which would make every draft look too dear.
            if drafted and self.drafted_last:
                per_token = timings.drafting / drafted
                previous = self.draft_seconds_per_token
                self.draft_seconds_per_token = (
                    per_token if previous is None else self._blend(previous, per_token)
                )
        self.drafted_last = drafted > 0
        # A probe whose drafter proposed nothing has passed all the same: only a draft the
        # controller asked for as a probe is judged as one.
        was_probe, self.probing = self.probing, False
        if verdict.num_accepted > 0:
            self.probe_wait = self.probe_every
        elif drafted and was_probe:
            self.probe_wait = min(2 * self.probe_wait, max(MAX_PROBE_WAIT, self.probe_every))
        # Position j was tried when drafts 1..j-1 were accepted: it succeeded if j <= accepted.
        for depth in range(min(verdict.num_accepted + 1, drafted)):
            success = 1.0 if depth < verdict.num_accepted else 0.0
            if depth < len(self.acceptance):
                self.acceptance[depth] = self._blend(self.acceptance[depth], success)
            else:
                self.acceptance.append(self._blend(self._acceptance_at(depth), success))
        self.length = self.best_length()
        if self.length == 0:
            self.plain_steps += 1
            if self.plain_steps >= self.probe_wait:  # look again whether drafting pays
                self.plain_steps = 0
                self.length = 1
                self.probing = True
        else:
            self.plain_steps = 0

    def _average_into(self, table: dict[int, float], key: int, value: float) -> None:
        table[key] = value if key not in table else self._blend(table[key], value)

    def _blend(self, old: float, new: float) -> float:
        return (1.0 - self.smoothing) * old + self.smoothing * new
