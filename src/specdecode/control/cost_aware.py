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
(`control/cost_curve.py`), so it plans from the first step. A length between two measured ones is
costed by linear interpolation; one beyond the longest measured optimistically, at the longest's
cost (and at the acceptance of the deepest measured position), so the controller tries longer
drafts until it has seen what they cost; and before settling on a length it measures the next
shorter one once.

Drafters that forecast each draft's acceptance (`DraftTree.confidence`, e.g. prompt lookup from
the length of its match) know more than these averages. When such a drafter's drafts are nearly
free (a step's drafting, measured, under `CHEAP_DRAFTING` of a plain step's cost), the
controller asks for its maximum and then `shorten`s the draft to the prefix with the best forecast
tokens per second, which may be no draft at all: long drafts where a long copy is under way, none
where the match is weak.
Losslessness does not depend on any of this: the controller only sizes the draft.
"""

from __future__ import annotations

from specdecode.control.base import Controller, StepTimings
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget, DraftTree
from specdecode.verify.base import Verdict

#: The most plain steps between two probes, however many have failed.
MAX_PROBE_WAIT = 64
#: Drafting the maximum counts as free below this fraction of a plain step's cost.
CHEAP_DRAFTING = 0.1


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
        self.draft_seconds_per_step: float | None = None
        self.forecasts = False  # the drafter's drafts carry a confidence per node
        self.reset()

    def reset(self) -> None:
        # Acceptance belongs to the prompt: start each sequence optimistic again.
        self.acceptance: list[float] = []  # [depth - 1] -> P(accept | all shallower accepted)
        self.length = self.initial
        self.plain_steps = 0
        self.probe_wait = self.probe_every
        self.probing = False  # a probe was asked for and has not drafted yet
        self.drafted_last = False
        self.proposed: int | None = None  # the last draft's length before `shorten` cut it
        self.asked_maximum = False  # the last budget was the maximum, for `shorten` to cut

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
        longer = [k for k in self.verify_seconds if k > length]
        if not shorter:
            return self.verify_seconds[min(longer)] if longer else None
        below = max(shorter)
        if below == length or not longer:
            return self.verify_seconds[below]
        above = min(longer)
        fraction = (length - below) / (above - below)
        cost_below, cost_above = self.verify_seconds[below], self.verify_seconds[above]
        return cost_below + fraction * (cost_above - cost_below)

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
        # Below the shortest measured length, a length is costed at that length's price, which
        # makes it look no cheaper: measure the next shorter length once before settling.
        if best > lowest and best - 1 not in self.verify_seconds:
            return best - 1
        return best

    # ---- the controller contract ---------------------------------------------------------------

    def budget(self) -> Budget:
        self.asked_maximum = self.forecasts and self._drafting_is_free()
        return Budget.chain(self.maximum if self.asked_maximum else self.length)

    def shorten(self, tree: DraftTree) -> DraftTree:
        self.proposed = tree.num_nodes
        # Sampled drafts stay whole: a cut chosen from forecasts of drafts drawn this step would
        # make keeping a draft depend on its own draw, which rejection sampling does not allow.
        if tree.confidence is None or tree.draft_probs is not None or not tree.is_chain:
            return tree
        self.forecasts = True
        # The draft is paid for already: only the verification's cost depends on the cut.
        rates = []  # [k] forecast tokens per second of verifying the first k drafts
        expected, reach = 1.0, 1.0
        for length, chance in enumerate([1.0, *tree.confidence.tolist()]):
            if length:
                reach *= chance
                expected += reach
            seconds = self._verify_cost(length)
            if seconds is None or seconds <= 0.0:
                return tree  # nothing measured yet
            rates.append(expected / seconds)
        lowest = 0 if self.allow_plain else min(1, tree.num_nodes)
        return tree.prefix(max(range(lowest, len(rates)), key=rates.__getitem__))

    def _drafting_is_free(self) -> bool:
        plain = self._verify_cost(0)
        if plain is None or self.draft_seconds_per_step is None:
            return False
        return self.draft_seconds_per_step < CHEAP_DRAFTING * plain

    def observe(self, verdict: Verdict, timings: StepTimings | None = None) -> None:
        drafted = verdict.num_draft_nodes
        # What the drafter drafted, before `shorten` cut it: what the drafting time paid for.
        proposed = drafted if self.proposed is None else max(self.proposed, drafted)
        self.proposed = None
        if timings is not None:
            self._average_into(self.verify_seconds, drafted, timings.verifying)
            # A draft after a step without one includes the draft model catching up on the
            # tokens it skipped (at a sequence's start, the whole prompt): a cost of resuming,
            # not of drafting, which would make every draft look too dear.
            if proposed and self.drafted_last:
                self.draft_seconds_per_token = self._blended(
                    self.draft_seconds_per_token, timings.drafting / proposed
                )
                self.draft_seconds_per_step = self._blended(
                    self.draft_seconds_per_step, timings.drafting
                )
        self.drafted_last = proposed > 0
        if self.asked_maximum:
            # The forecasts sized this draft; the controller's own model of a step (acceptance
            # by position, probes) is for drafts it sizes itself, and these were cut where the
            # forecast was good, which would make deep positions look better than they are.
            return
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

    def _blended(self, old: float | None, new: float) -> float:
        return new if old is None else self._blend(old, new)
