"""The scheduler: one thread owns the model and runs the requests' jobs, step by step.

This first scheduler runs one job at a time, in arrival order (a batch of one): the engine's
single-sequence loop, unchanged, so each request's output is exactly `generate`'s. Requests
beyond `max_waiting` are refused at once (the HTTP layer answers 429), never left to hang. Each
step's output goes to the request's event loop through `call_soon_threadsafe`; a job whose client
went away is dropped before it starts, or stopped after the step it is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from specdecode.api import SpecDecoder
from specdecode.config import SamplingParams, SpecConfig
from specdecode.engine import GenerationStats, StepOutput
from specdecode.errors import SpecDecodeError
from specdecode.serve.metrics import ServerMetrics


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


class Scheduler:
    """Runs jobs on a thread of its own (see the module docstring)."""

    def __init__(self, llm: SpecDecoder, metrics: ServerMetrics, max_waiting: int = 64) -> None:
        self.llm = llm
        self.metrics = metrics
        self.max_waiting = max_waiting
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="specdecode-scheduler", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> None:
        self._thread.start()

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
        """Refuse what waits, let the running job end at its next step, and join the thread."""
        with self._lock:
            self._stopping.set()
        self._jobs.put(None)  # after every job already queued: each is answered first
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self.metrics.waiting.labels(self.metrics.model).set(self._waiting)
            if self._stopping.is_set():
                job.deliver(ShuttingDown("the server shut down before this request started"))
                job.deliver(None)
            elif job.cancelled.is_set():
                job.deliver(None)
            else:
                self._serve(job)

    def _serve(self, job: Job) -> None:
        metrics, model = self.metrics, self.metrics.model
        started = time.perf_counter()
        metrics.queue_time.labels(model).observe(started - job.enqueued)
        metrics.running.labels(model).inc()
        stats, reason, first, last = GenerationStats(), "abort", True, started
        try:
            for step in self.llm.engine.stream(job.prompt_ids, job.sampling, job.spec):
                now = time.perf_counter()
                stats = step.stats
                if step.token_ids:
                    if first:
                        metrics.time_to_first_token.labels(model).observe(now - job.enqueued)
                        first = False
                    else:
                        per_token = (now - last) / len(step.token_ids)
                        for _ in step.token_ids:
                            metrics.inter_token_latency.labels(model).observe(per_token)
                    last = now
                job.deliver(step)
                if step.finished:
                    reason = stats.stop_reason
                    break
                if job.cancelled.is_set() or self._stopping.is_set():
                    break  # the client went away, or the server stops: free the model now
        except Exception as exc:  # noqa: BLE001 - the request fails, the server goes on
            reason = "error"
            job.deliver(exc)
        finally:
            metrics.running.labels(model).dec()
            metrics.finished(stats, reason)
            job.deliver(None)
