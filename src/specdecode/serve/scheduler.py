"""The scheduler: one thread owns the model and runs every request's sequence, step by step.

Continuous batching: up to `max_batch` sequences run at once, each on a slot of its own (a fork of
the target, and of the draft model if there is one: its own KV cache, drafter, verifier, controller
and random generator). Each step proposes every sequence's draft tree, verifies all of them in one
target forward (`Backend.forward_trees`, ragged: each sequence's rows, no padding), then commits
each sequence's verdict; requests join between steps as slots free up (a new request's prompt is
prefilled on its own first) and leave when they finish, fail or their client goes away (its slot
is free for the next step). How far each sequence drafts is planned for the whole batch from the
measured cost of batched forwards and each sequence's acceptance so far (`control/goodput.py`): a
busy batch drafts less, down to nothing. A greedy request's tokens are those of `generate` alone,
whatever else runs: its logits have the same bits in any batch (the exact kernels).

The scheduler runs on a thread of its own (`start`) or, as `specdecode serve` runs it, on the main
thread that loaded the model, with the HTTP server on another (`run`). Requests beyond
`max_waiting` are refused at once (the HTTP layer answers 429), never left to
hang. Each step's output goes to the request's event loop through `call_soon_threadsafe`. A
backend that cannot batch (`supports_batching` False) runs one request at a time, and one that
holds a set number of sequences (`max_sequences`, llama.cpp's cache) at most that many.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from specdecode.api import SpecDecoder
from specdecode.backends.base import Backend
from specdecode.config import SamplingParams, SpecConfig
from specdecode.control import cost_curve
from specdecode.control.goodput import Outlook, interpolated, plan_draft_lengths
from specdecode.engine import Decoding, GenerationStats, StepOutput
from specdecode.errors import SpecDecodeError
from specdecode.serve.metrics import ServerMetrics
from specdecode.tree import DraftTree

DEFAULT_MAX_BATCH = 8


class QueueFull(SpecDecodeError):
    """The server has `max_waiting` requests waiting already."""


class ShuttingDown(SpecDecodeError):
    """The server stops: no new work, and what waits is not started."""


@dataclass
class Job:
    """One request's work, and where its output goes."""

    prompt_ids: list[int]
    sampling: SamplingParams
    spec: SpecConfig
    deliver: Callable[[StepOutput | BaseException | None], None]  # None: no more output
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    @classmethod
    def for_loop(
        cls, prompt_ids: list[int], sampling: SamplingParams, spec: SpecConfig
    ) -> tuple[Job, asyncio.Queue]:
        """A job whose output arrives on an asyncio queue of the running event loop."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def deliver(item: StepOutput | BaseException | None) -> None:
            # A closed loop (the server is gone) has nobody listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(outputs.put_nowait, item)

        return cls(prompt_ids, sampling, spec, deliver), outputs


@dataclass
class _Running:
    """A job with its sequence in the batch (`slot` -1 once it left)."""

    job: Job
    slot: int
    decoding: Decoding
    first_token: bool = True
    last_output: float = 0.0


class Scheduler:
    """Runs jobs step by step, on a thread of its own (`start`) or the caller's (`run`); see the
    module docstring."""

    def __init__(
        self,
        llm: SpecDecoder,
        metrics: ServerMetrics,
        max_waiting: int = 64,
        max_batch: int = DEFAULT_MAX_BATCH,
        forward_seconds: Callable[[int], float] | None = None,
    ) -> None:
        """`forward_seconds(rows)`: what a verification forward over that many rows costs; by
        default measured when the scheduler starts (batching backends only)."""
        if max_batch < 1:
            raise SpecDecodeError(f"max_batch must be >= 1, got {max_batch}")
        engine = llm.engine
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        batching = engine.target.supports_batching and (
            engine.draft_model is None or engine.draft_model.supports_batching
        )
        # A backend that holds a set number of sequences (llama.cpp's cache) caps the batch.
        held = [b.max_sequences for b in (engine.target, engine.draft_model) if b is not None]
        self.max_batch = min([max_batch, *(n for n in held if n is not None)]) if batching else 1
        draft = engine.draft_model
        if draft is not None and draft.max_sequences is not None and llm.spec.tree != "chain":
            # A draft model's tree stays in its cache until its sequence's next step, and a
            # shared cache (llama.cpp's) compacts only when no sequence holds a tree.
            self.max_batch = 1
        self.forward_seconds = forward_seconds
        # Slot 0 is the engine's own backends; the others are forked on first use, then kept
        # (their caches are reused by the requests that follow).
        self._slots: list[tuple[Backend, Backend | None]] = [(engine.target, engine.draft_model)]
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="specdecode-scheduler", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> None:
        """Run the jobs on a thread of the scheduler's own (see `run`)."""
        self.prepare()
        self._thread.start()

    def run(self) -> None:
        """Run the jobs on the calling thread until `stop()`. The thread that loaded the model
        should: OpenMP (PyTorch's, llama.cpp's) keeps a pool of worker threads per calling
        thread, and once a process holds more of them than it has cores, libgomp stops spinning
        between parallel regions and sleeps instead (measured: llama.cpp's decoding 20% slower on
        a second thread of a 2-core machine, the same on the main one)."""
        self.prepare()
        self._run()

    def prepare(self) -> None:
        """Measure what batched forwards cost, where the planner needs it and was not given it
        (and the single-sequence curve a cost-aware controller reads, where the backend caches
        one), before any request holds the model."""
        self.engine.forward_costs()
        if self.max_batch > 1 and self.forward_seconds is None:
            lengths = cost_curve.fitting(cost_curve.BATCH_LENGTHS, self.engine.target.max_context)
            if not lengths:
                return  # a context too small to measure in: every request drafts as alone
            print("measuring what batched forwards cost on this machine...", file=sys.stderr)
            seconds = cost_curve.measure(self.engine.target, lengths)
            self.forward_seconds = interpolated({k + 1: v for k, v in seconds.items()})

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise `QueueFull` at once."""
        with self._lock:
            if self._stopping.is_set():
                raise ShuttingDown("the server is shutting down")
            if self._waiting >= self.max_waiting:
                raise QueueFull(f"the server has {self.max_waiting} requests waiting: retry later")
            self._waiting += 1
            self.metrics.waiting.labels(self.metrics.model).set(self._waiting)
        self._jobs.put(job)

    def stop(self, timeout: float | None = None) -> None:
        """Refuse what waits, end the running jobs after their current step, and join the thread
        (if the scheduler has one; `run` returns)."""
        with self._lock:
            self._stopping.set()
        self._jobs.put(None)  # after every job already queued: each is answered first
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        running: list[_Running] = []
        while True:
            if self._stopping.is_set():
                for entry in running:  # the server stops: free the model now
                    self._end(entry, "abort")
                running = []
            # Admit waiting jobs while slots are free; wait for one only when nothing runs.
            while len(running) < self.max_batch:
                try:
                    job = self._jobs.get(block=not running)
                except queue.Empty:
                    break
                if job is None:
                    for entry in running:  # stop() came while this step's jobs were admitted
                        self._end(entry, "abort")
                    return
                entry = self._admit(job, {entry.slot for entry in running})
                if entry is not None:
                    running.append(entry)
            if running:
                self._step(running)
                running = [entry for entry in running if entry.slot >= 0]

    def _admit(self, job: Job, taken: set[int]) -> _Running | None:
        """Start `job` on a free slot (its prompt prefilled), or answer it at once."""
        metrics, model = self.metrics, self.metrics.model
        with self._lock:
            self._waiting -= 1
            metrics.waiting.labels(model).set(self._waiting)
        if self._stopping.is_set():
            job.deliver(ShuttingDown("the server shut down before this request started"))
            job.deliver(None)
            return None
        if job.cancelled.is_set():
            job.deliver(None)
            return None
        slot = min(set(range(self.max_batch)) - taken)
        metrics.queue_time.labels(model).observe(time.perf_counter() - job.enqueued)
        try:
            target, draft_model = self._slot(slot)
            decoding = self.engine.start(
                job.prompt_ids, job.sampling, job.spec, target=target, draft_model=draft_model
            )
        except Exception as exc:  # noqa: BLE001 - the request fails, the server goes on
            metrics.finished(GenerationStats(prompt_tokens=len(job.prompt_ids)), "error")
            job.deliver(exc)
            job.deliver(None)
            return None
        metrics.running.labels(model).inc()
        return _Running(job, slot, decoding, last_output=time.perf_counter())

    def _slot(self, slot: int) -> tuple[Backend, Backend | None]:
        while len(self._slots) <= slot:
            target, draft_model = self._slots[0]
            self._slots.append((target.fork(), draft_model.fork() if draft_model else None))
        return self._slots[slot]

    def _step(self, running: list[_Running]) -> None:
        """One step of every running sequence: drafts, one verification forward, verdicts."""
        caps: list[int | None] = [None] * len(running)
        if self.forward_seconds is not None:
            caps = list(plan_draft_lengths([_outlook(e) for e in running], self.forward_seconds))
        proposed: list[tuple[_Running, DraftTree]] = []
        for entry, cap in zip(running, caps, strict=True):
            try:
                tree = entry.decoding.propose(cap)
            except Exception as exc:  # noqa: BLE001 - the request fails, the batch goes on
                self._fail(entry, exc)
                continue
            if tree is None:
                self._deliver(entry, entry.decoding.finish())
            else:
                proposed.append((entry, tree))
        if proposed:
            sequences = [entry.decoding.target for entry, _ in proposed]
            trees = [tree for _, tree in proposed]
            self.metrics.batch_size.labels(self.metrics.model).observe(len(trees))
            rows = sum(tree.num_nodes + 1 for tree in trees)
            self.metrics.forward_rows.labels(self.metrics.model).observe(rows)
            started = time.perf_counter()
            try:
                logits = self.engine.target.forward_trees(sequences, trees)
            except Exception as exc:  # noqa: BLE001 - fails this batch's requests, not the server
                for entry, _ in proposed:
                    self._fail(entry, exc)
                return
            forward_seconds = time.perf_counter() - started
            for (entry, tree), tree_logits in zip(proposed, logits, strict=True):
                try:
                    step = entry.decoding.advance(tree, tree_logits, forward_seconds)
                except Exception as exc:  # noqa: BLE001
                    self._fail(entry, exc)
                    continue
                self._deliver(entry, step)
        for entry in running:
            if entry.slot >= 0 and entry.job.cancelled.is_set():
                self._end(entry, "abort")  # the client went away: its slot is free now

    def _deliver(self, entry: _Running, step: StepOutput) -> None:
        metrics, model = self.metrics, self.metrics.model
        now = time.perf_counter()
        if step.token_ids:
            if entry.first_token:
                metrics.time_to_first_token.labels(model).observe(now - entry.job.enqueued)
                entry.first_token = False
            else:
                per_token = (now - entry.last_output) / len(step.token_ids)
                for _ in step.token_ids:
                    metrics.inter_token_latency.labels(model).observe(per_token)
            entry.last_output = now
        entry.job.deliver(step)
        if step.finished:
            self._end(entry, step.stats.stop_reason)

    def _fail(self, entry: _Running, exc: BaseException) -> None:
        entry.job.deliver(exc)
        self._end(entry, "error")

    def _end(self, entry: _Running, reason: str) -> None:
        if entry.slot < 0:
            return
        entry.slot = -1
        try:
            entry.decoding.close()
        except Exception as exc:  # noqa: BLE001 - the request is over; the loop must go on
            print(f"warning: closing a request failed: {exc}", file=sys.stderr)
        self.metrics.running.labels(self.metrics.model).dec()
        self.metrics.finished(entry.decoding.stats, reason)
        entry.job.deliver(None)


def _outlook(entry: _Running) -> Outlook:
    """What the goodput planner knows of a running sequence."""
    decoding = entry.decoding
    stats, spec = decoding.stats, decoding.spec
    # Drafting time per drafted token (per step where few are drafted: prompt lookup's look-ups).
    per_draft = stats.drafting_seconds / max(stats.drafted_tokens, stats.target_forwards, 1)
    return Outlook.from_history(
        stats.accepted_tokens,
        stats.reached_tokens,
        decoding.draft_limit(),  # its own controller's length: rows planned beyond it go unused
        1 if decoding.shape is None else spec.tree_width,
        per_draft,
    )
