"""The speculative decoding loop: draft -> verify -> commit, as a generator.

Contract: `Engine.stream()` yields the tokens of each step as soon as they are verified. At
temperature 0 with an exact verifier the tokens are those plain greedy decoding of the same backend
produces; with a lossless sampling verifier they follow the target's distribution. Drafters,
verifiers and controllers are picked by name from their registries; the engine knows none of them.

Per step (see DESIGN.md):

    budget  = controller.budget()
    tree    = controller.shorten(drafter.propose(context, budget))   # cut where it stops paying
    logits  = target.forward_tree(tree)                  # [N+1, V], one forward
    verdict = verifier.verify(tree, logits, sampling, rng)
    target.commit(verdict.path, verdict.next_token)
    drafter.update(verdict, TargetOutput(logits, target.last_hidden, tokens=root + tree.tokens))
    controller.observe(verdict, timings)

Generation stops at an end-of-sequence token (not emitted), at `max_new_tokens`, or once the text
contains a stop string (the text is cut before it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from specdecode.backends.base import Backend
from specdecode.config import SamplingParams, SpecConfig
from specdecode.control import StepTimings, make_controller
from specdecode.drafters import Drafter, DrafterResources, TargetOutput, make_drafter
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget, DraftTree, SiblingDraws
from specdecode.trees import CHAIN, TreeShape, make_tree_shape
from specdecode.verify import Verdict, Verifier, make_verifier


class TextDecoder(Protocol):
    eos_token_ids: frozenset[int]

    def decode(self, ids: Sequence[int]) -> str: ...


#: Called after each verification with (draft tree, target logits [N+1, V], verdict).
StepObserver = Callable[[DraftTree, torch.Tensor, Verdict], None]


@dataclass
class GenerationStats:
    """What one generation cost and how well speculation did.

    `mean_accepted_tokens` is the mean number of tokens each target forward produced (accepted
    drafts plus the target's own token, so plain decoding scores 1.0); `acceptance_histogram[i]`
    counts the forwards that accepted exactly `i` drafted tokens.
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    drafting_seconds: float = 0.0
    verifying_seconds: float = 0.0
    target_forwards: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    reached_tokens: int = 0  # drafts whose parent was accepted: the verifier's chances to accept
    emitted_tokens: int = 0  # tokens the verdicts produced, before cutting at EOS / the limit
    acceptance_histogram: list[int] = field(default_factory=list)
    drafted_at_depth: list[int] = field(default_factory=list)  # [d] = steps that drafted depth d+1
    accepted_at_depth: list[int] = field(default_factory=list)  # [d] = steps that accepted it
    stop_reason: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        return self.emitted_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate_by_depth(self) -> list[float]:
        accepted = self.accepted_at_depth + [0] * len(self.drafted_at_depth)
        return [accepted[d] / drafted for d, drafted in enumerate(self.drafted_at_depth)]

    def record(self, verdict: Verdict, draft_depth: int, timings: StepTimings) -> None:
        self.target_forwards += 1
        self.drafted_tokens += verdict.num_draft_nodes
        self.accepted_tokens += verdict.num_accepted
        self.reached_tokens += min(draft_depth, verdict.num_accepted + 1)
        self.emitted_tokens += len(verdict.tokens)
        _bump(self.acceptance_histogram, verdict.num_accepted)
        for depth in range(draft_depth):
            _bump(self.drafted_at_depth, depth)
            if depth < verdict.num_accepted:
                _bump(self.accepted_at_depth, depth)
        self.drafting_seconds += timings.drafting
        self.verifying_seconds += timings.verifying

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tokens_per_second"] = self.tokens_per_second
        out["mean_accepted_tokens"] = self.mean_accepted_tokens
        out["acceptance_rate_by_depth"] = self.acceptance_rate_by_depth
        return out

    def summary(self) -> str:
        histogram = " ".join(f"{i}:{n}" for i, n in enumerate(self.acceptance_histogram))
        return (
            f"{self.new_tokens} tokens in {self.seconds:.2f}s "
            f"({self.tokens_per_second:.2f} tok/s), {self.target_forwards} target forwards, "
            f"{self.mean_accepted_tokens:.2f} tokens/forward, "
            f"accepted per forward [{histogram}]"
        )


def _bump(counts: list[int], index: int) -> None:
    if len(counts) <= index:
        counts.extend([0] * (index + 1 - len(counts)))
    counts[index] += 1


@dataclass
class StepOutput:
    """One step's worth of output, as it streams."""

    token_ids: list[int]
    text: str
    stats: GenerationStats
    finished: bool = False


class _TextTracker:
    """Incremental detokenization with stop strings."""

    def __init__(self, tokenizer: TextDecoder | None, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.emitted = ""  # text already handed out

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """Add tokens; return the new text and whether a stop string was hit."""
        self.ids.extend(ids)
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(self.ids)
        hit = False
        for stop in self.stop:
            # Search only where a new match can start, so earlier text is never re-cut.
            at = text.find(stop, max(0, len(self.emitted) - len(stop) + 1))
            if at != -1:
                text, hit = text[:at], True
        if not hit:
            # Hold back an incomplete multi-byte character, and any tail that could be the start
            # of a stop string, until the next tokens settle it.
            text = text.rstrip("\ufffd")
            held = max((_overlap(text, s) for s in self.stop), default=0)
            text = text[: len(text) - held]
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted += delta
        return delta, hit

    def flush(self) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids)
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted += delta
        return delta


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


class Engine:
    """Runs speculative decoding of `target`, optionally with a `draft_model` backend."""

    def __init__(
        self,
        target: Backend,
        tokenizer: TextDecoder | None = None,
        draft_model: Backend | None = None,
        model_name: str = "",
        vocabulary: str = "",
    ) -> None:
        """`model_name`: the target's registry name or path (where drafters find its head);
        `vocabulary`: the tokenizer's fingerprint, which drafters' saved state is checked
        against."""
        self.target = target
        self.tokenizer = tokenizer
        self.draft_model = draft_model
        self.model_name = model_name
        self.vocabulary = vocabulary
        #: What drafters keep across requests (`DrafterResources.shared`).
        self.drafter_state: dict[str, Any] = {}
        self._forward_costs: dict[int, float] | None = None

    def forward_costs(self) -> dict[int, float] | None:
        """The target's seconds per verification forward by draft length (measured once, then
        cached on disk), or None where the backend's costs are learned online only."""
        if self._forward_costs is None:
            from specdecode.control.cost_curve import load_or_measure

            self._forward_costs = load_or_measure(self.target)
        return self._forward_costs

    def generate(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        spec: SpecConfig,
        observe: StepObserver | None = None,
    ) -> tuple[list[int], str, GenerationStats]:
        """Run to completion; return (token ids, text, statistics)."""
        token_ids: list[int] = []
        text = ""
        stats = GenerationStats()
        for step in self.stream(prompt_ids, sampling, spec, observe):
            token_ids.extend(step.token_ids)
            text += step.text
            stats = step.stats
        return token_ids, text, stats

    def stream(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        spec: SpecConfig,
        observe: StepObserver | None = None,
    ) -> Iterator[StepOutput]:
        """Generate step by step; `observe`, if given, sees every step's draft tree, the
        target's logits over it and the verdict (for analysis; it must not modify them)."""
        decoding = self.start(prompt_ids, sampling, spec, observe)
        try:
            while True:
                tree = decoding.propose()
                if tree is None:
                    yield decoding.finish()
                    return
                step = decoding.advance(tree, decoding.target.forward_tree(tree))
                yield step
                if step.finished:
                    return
        finally:
            decoding.close()  # also when the caller stops early or a step fails

    def start(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        spec: SpecConfig,
        observe: StepObserver | None = None,
        target: Backend | None = None,
        draft_model: Backend | None = None,
    ) -> Decoding:
        """Check the request, build its drafter, verifier and controller, and prefill the
        prompt: a `Decoding` whose steps the caller drives. `target` and `draft_model` default to
        the engine's; a scheduler passes forks of them, one per sequence it runs at once."""
        return Decoding(
            self,
            prompt_ids,
            sampling,
            spec,
            observe,
            target or self.target,
            draft_model or self.draft_model,
        )


class Decoding:
    """One sequence being decoded: the engine's loop with the target forward left to the caller,
    so that a scheduler can verify many sequences' trees in one forward (`Backend.forward_trees`).

        tree = decoding.propose(max_drafts)        # None: the sequence ended without a step
        step = decoding.advance(tree, target.forward_tree(tree))

    A greedy sequence's tokens do not depend on what else shares its forwards: its target
    logits have the same bits (the exact kernels), and its drafter, verifier and controller are
    its own. A sampled sequence keeps the target's distribution; its exact tokens for a seed can
    differ from a lone run's where a scheduler caps its drafts otherwise (other random draws).
    """

    def __init__(
        self,
        engine: Engine,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        spec: SpecConfig,
        observe: StepObserver | None,
        target: Backend,
        draft_model: Backend | None,
    ) -> None:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise SpecDecodeError("the prompt is empty: give at least one token of text")
        if len(prompt) >= target.max_context:
            raise SpecDecodeError(
                f"the prompt has {len(prompt)} tokens but the model's context holds "
                f"{target.max_context}: shorten the prompt"
            )
        shape = None if spec.tree == CHAIN else make_tree_shape(spec.tree, spec.tree_options)
        if shape is not None and spec.tree_nodes is not None:
            room = target.max_context - len(prompt)  # the root and the nodes must fit
            if spec.tree_nodes > room:
                raise SpecDecodeError(
                    f"a tree of {spec.tree_nodes} nodes does not fit in the model's context "
                    f"({target.max_context} tokens) after a {len(prompt)}-token prompt: "
                    f"lower --tree-nodes to at most {room}"
                )
        resources = DrafterResources(
            target, draft_model, shape, engine.model_name, engine.drafter_state, engine.vocabulary
        )
        drafter = make_drafter(spec.drafter, spec.drafter_options, resources)
        # The layers a trained head reads, captured from the forwards the target runs anyway (none
        # for other drafters, which then cost the target nothing).
        target.capture_hidden(drafter.hidden_layers)
        verifier = _pick_verifier(spec, sampling, shape, drafter)
        if shape is not None and not target.supports_trees:
            raise SpecDecodeError(
                f"the {type(target).__name__} backend verifies chains only: use --tree chain"
            )
        controller = make_controller(
            spec.controller, spec.num_draft_tokens, spec.max_draft_tokens, spec.controller_options
        )
        if controller.uses_costs:
            costs = engine.forward_costs()
            if costs is not None:
                controller.use_costs(costs)
        if shape is not None and controller.chains_only:
            raise SpecDecodeError(
                f"the {controller.name!r} controller plans chains: use --controller heuristic or "
                "fixed with --tree"
            )
        self.eos = (
            frozenset()
            if sampling.ignore_eos or engine.tokenizer is None
            else (engine.tokenizer.eos_token_ids)
        )
        self.rng = torch.Generator()
        if sampling.seed is not None:
            self.rng.manual_seed(sampling.seed)
        else:
            self.rng.seed()
        self.target, self.sampling, self.spec, self.shape = target, sampling, spec, shape
        self.drafter, self.verifier, self.controller = drafter, verifier, controller
        self.closed = False
        self.observe = observe

        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self.text = _TextTracker(engine.tokenizer, sampling.stop)
        self.started = time.perf_counter()
        with torch.inference_mode():
            target.prefill(prompt)
            prefilled = torch.tensor(prompt[:-1], dtype=torch.long)
            drafter.begin(
                prompt, sampling, self.rng, TargetOutput(None, target.prompt_hidden, prefilled)
            )
            controller.reset()
        self.stats.prefill_seconds = time.perf_counter() - self.started
        self.context = list(prompt)
        self._step_start = self._drafted = 0.0

    def draft_limit(self) -> int:
        """How deep the next step's drafts may go uncapped: the controller's budget, within the
        token limit and the context."""
        remaining, room = self._left()
        return max(0, min(self.controller.budget().max_depth, remaining - 1, room - 1))

    def _left(self) -> tuple[int, int]:
        """Tokens the request may still produce, and free positions in the context."""
        remaining = self.sampling.max_new_tokens - self.stats.new_tokens
        return remaining, self.target.max_context - len(self.context)

    def propose(self, max_drafts: int | None = None) -> DraftTree | None:
        """The next step's draft tree (no deeper than `max_drafts`), or None where the sequence
        is at its token limit or the end of the context (then `finish()` gives its last output)."""
        remaining, room = self._left()
        if remaining <= 0 or room <= 0:
            self.stats.stop_reason = "length" if remaining <= 0 else "context"
            return None
        with torch.inference_mode():
            self._step_start = time.perf_counter()
            budget = self.controller.budget()
            if self.shape is not None:  # the controller sets the depth; nodes default to d x w
                budget = Budget(budget.max_depth, self.spec.tree_width, self.spec.tree_nodes)
            depth = min(remaining - 1, room - 1)
            if max_drafts is not None:
                depth = min(depth, max_drafts)
            budget = _capped(budget, depth, room - 1)
            tree = self.controller.shorten(self.drafter.propose(self.context, budget))
            self._drafted = time.perf_counter()
        if tree.num_nodes and not tree.is_chain and not self.verifier.supports_trees:
            raise SpecDecodeError(
                f"the {self.verifier.name!r} verifier takes chains but the drafter built a tree"
            )
        return tree

    def advance(
        self, tree: DraftTree, target_logits: torch.Tensor, forward_seconds: float | None = None
    ) -> StepOutput:
        """Verify `tree` against the target's logits over it (`[N+1, V]`, from `forward_tree`
        of this sequence's target), commit, and return the step's output. `forward_seconds`:
        what the forward took, where it was shared with other sequences (else the time since
        `propose` returned is the forward's)."""
        stats, sampling = self.stats, self.sampling
        verify_start = time.perf_counter()
        with torch.inference_mode():
            verdict = self.verifier.verify(tree, target_logits, sampling, self.rng)
            self.target.commit(verdict.path, verdict.next_token)
            verified = time.perf_counter()
            verifying = (
                verified - self._drafted
                if forward_seconds is None
                else forward_seconds + verified - verify_start
            )
            timings = StepTimings(self._drafted - self._step_start, verifying)
            rows = torch.cat([torch.tensor(self.context[-1:]), tree.tokens])  # [N+1]
            output = TargetOutput(target_logits, self.target.last_hidden, rows)
            self.drafter.update(verdict, output)
            self.controller.observe(verdict, timings)
            if self.observe is not None:  # outside the timed part of the step
                self.observe(tree, target_logits, verdict)
        depth = int(tree.depths.max()) if tree.num_nodes else 0
        stats.record(verdict, depth, timings)

        remaining = sampling.max_new_tokens - stats.new_tokens
        new_ids = verdict.tokens[:remaining]
        finished = False
        for i, token in enumerate(new_ids):
            if token in self.eos:
                new_ids, finished = new_ids[:i], True
                stats.stop_reason = "eos"
                break
        self.context.extend(new_ids)
        stats.new_tokens += len(new_ids)
        delta, hit_stop = self.text.push(new_ids)
        if hit_stop:
            finished = True
            stats.stop_reason = "stop"
        elif stats.new_tokens >= sampling.max_new_tokens:
            finished = True
            stats.stop_reason = "length"
        stats.seconds = time.perf_counter() - self.started
        if finished and not hit_stop:
            delta += self.text.flush()
        if finished:
            self.close()
        return StepOutput(new_ids, delta, stats, finished)

    def finish(self) -> StepOutput:
        """The last output of a sequence that `propose` ended."""
        self.stats.seconds = time.perf_counter() - self.started
        self.close()
        return StepOutput([], self.text.flush(), self.stats, True)

    def close(self) -> None:
        """The sequence is over, however it ended (a scheduler closes one whose client left):
        its drafter keeps what it learned across requests."""
        if not self.closed:
            self.closed = True
            # A step that failed between its forward and its commit leaves its tree in the cache.
            self.target.truncate(len(self.context) - 1)
            self.drafter.end(self.context)


def verifier_name(spec: SpecConfig, sampling: SamplingParams, shape: TreeShape | None) -> str:
    """The verifier a generation uses: the named one, else the exact one for the sampling mode
    (greedy at temperature 0; rejection for chains, the tree shape's own for trees)."""
    if spec.verifier is not None:
        return spec.verifier
    if sampling.greedy:
        return "greedy"
    return "rejection" if shape is None else shape.sampling_verifier


def sibling_draws(shape: TreeShape | None, samples_drafts: bool) -> SiblingDraws:
    """How the drafts' siblings are picked at temperature > 0: by the tree shape, or for a
    drafter's own chain i.i.d. (sampled) or deterministically."""
    if not samples_drafts:
        return SiblingDraws.DETERMINISTIC
    return SiblingDraws.INDEPENDENT if shape is None else shape.siblings


def _pick_verifier(
    spec: SpecConfig, sampling: SamplingParams, shape: TreeShape | None, drafter: Drafter
) -> Verifier:
    """The named verifier, or the exact one for the sampling mode and draft shape. Refuses, before
    anything is decoded, a chains-only verifier with a tree, and a lossless verifier with drafts
    it is not lossless for (it would silently change the output distribution)."""
    name = verifier_name(spec, sampling, shape)
    verifier = make_verifier(name)
    if shape is not None and not verifier.supports_trees:
        raise SpecDecodeError(
            f"the {name!r} verifier takes chains but --tree {shape.name} builds trees; use "
            f"--verifier {shape.sampling_verifier} (or greedy at temperature 0)"
        )
    if sampling.greedy or not verifier.lossless:
        return verifier
    right_one = "rejection" if shape is None else shape.sampling_verifier
    if not verifier.lossless_for:
        raise SpecDecodeError(
            f"the {name!r} verifier is exact at temperature 0 only; use --verifier {right_one} "
            f"at temperature {sampling.temperature}"
        )
    draws = sibling_draws(shape, drafter.samples_drafts)
    # On a chain (one child per node) every way of drawing siblings is the same.
    compatible = shape is None or draws in verifier.lossless_for
    # On a chain every verifier takes point masses (one child per node: nothing to select).
    if shape is not None and verifier.requires_draft_probs and draws is SiblingDraws.DETERMINISTIC:
        raise SpecDecodeError(
            f"the {name!r} verifier needs the draft distribution, which a {shape.name!r} tree "
            f"does not give at temperature > 0 (its nodes are chosen, not drawn); use --verifier "
            f"{right_one}, or a tree whose siblings are drawn (--tree iid)"
        )
    if not compatible:
        raise SpecDecodeError(
            f"the {name!r} verifier is not lossless for sibling drafts {draws.value} (the "
            f"{shape.name!r} tree) at temperature {sampling.temperature}; use --verifier "
            f"{right_one}"
        )
    return verifier


def _capped(budget: Budget, depth: int, nodes: int) -> Budget:
    """The budget, no deeper than `depth` (so drafts never run past the token limit) and with no
    more than `nodes` nodes (so a tree fits in the context)."""
    depth = max(0, min(depth, budget.max_depth))
    most = budget.max_nodes if budget.max_nodes is not None else depth * budget.max_width
    most = max(0, min(most, nodes, depth * budget.max_width))
    if depth == budget.max_depth and most == budget.max_nodes:
        return budget
    return Budget(max_depth=depth, max_width=budget.max_width, max_nodes=most)
