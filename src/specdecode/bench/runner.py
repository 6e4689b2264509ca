"""Run methods on prompts, interleaved with the baseline, one record per (method, prompt, repeat).

For each prompt and repeat the baseline (plain decoding through the same engine) runs first, then
every method, so slow drift of a shared machine hits all of them alike and cancels in the ratios.
One short untimed warm-up generation per method comes first. Greedy outputs of our methods are
compared token for token with the baseline's: a mismatch is a bug, and the report shows it first.
Drafters that learn text across requests (suffix) learn within a session only: the requests of
one `session` of the suite, in the suite's order; every other prompt starts with nothing learned.
Drafters that learn only the target's own statistics (token recycling) keep them across all the
prompts of a repeat, as in a server, and never across repeats (a repeat must not meet its own
earlier forwards).

Methods may run on another model backend than the run's (a methods file's `backend = ...`). Each
such backend gets its own plain-decoding baseline, `none-BACKEND`, because losslessness is token
identity with plain decoding *on the same backend* (two backends' numerics differ); speed-ups are
still reported against the run's baseline, `none`.

Records go to a sink as soon as they exist (the CLI appends them to `results.jsonl`), so an
interrupted run keeps what it measured, and `done` lets a resumed run skip it.
"""

from __future__ import annotations

import json
import platform
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from specdecode.api import SpecDecoder
from specdecode.bench.memory import PeakMemory
from specdecode.bench.methods import BASELINE, Method
from specdecode.bench.peers import Peer
from specdecode.bench.suites import Prompt
from specdecode.config import SamplingParams, SpecConfig
from specdecode.drafters import DRAFTERS
from specdecode.errors import SpecDecodeError

WARM_UP_TOKENS = 16


@dataclass
class Record:
    method: str
    prompt_id: str
    category: str
    repeat: int
    new_tokens: int
    seconds: float
    tokens_per_second: float
    peak_memory_mb: float
    target_forwards: int | None = None
    mean_accepted_tokens: float | None = None
    acceptance_histogram: list[int] = field(default_factory=list)
    acceptance_rate_by_depth: list[float] = field(default_factory=list)
    # [d]: forwards whose draft reached depth d+1, and those that accepted it (summed over
    # prompts, these give each depth's acceptance rate, weighted as it was drafted)
    drafted_at_depth: list[int] = field(default_factory=list)
    accepted_at_depth: list[int] = field(default_factory=list)
    prefill_seconds: float | None = None
    drafting_seconds: float | None = None
    verifying_seconds: float | None = None
    other_seconds: float | None = None  # detokenizing, bookkeeping: seconds minus the rest
    draft_budget: int | None = None  # the method's (initial) draft length
    sweep: str | None = None  # the sweep this method belongs to (methods files)
    exact: bool | None = None  # greedy output equals the baseline's token for token
    backend: str | None = None  # the model backend of our methods; None for peers
    token_ids: list[int] = field(default_factory=list)
    # When the run ended (UTC, ISO 8601): a run resumed across days can be audited and a stretch
    # measured on a busy machine found again.
    finished_at: str | None = None
    # The CPU and thread count it ran on: tokens/s and even ratios differ between machines, so a
    # run resumed on another machine is refused (see `this_machine`).
    machine: str | None = None
    # The request's place in its suite session (1 = first), where drafters learn across requests;
    # None for a prompt outside any session.
    session_index: int | None = None

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Tokens/s after the prompt's prefill, as llama.cpp reports its evaluation speed."""
        if self.prefill_seconds is None or self.seconds <= self.prefill_seconds:
            return None
        return self.new_tokens / (self.seconds - self.prefill_seconds)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.method, self.prompt_id, self.repeat)


def read_records(path: Path) -> list[Record]:
    """Records of an earlier run, in run order (a torn last line, from a kill mid-write, is
    dropped; a record run again, after a resumed run repeated a prompt cut off mid-way, replaces
    the earlier one)."""
    names = {f.name for f in fields(Record)}
    records: dict[tuple[str, str, int], Record] = {}
    for line in path.read_text().splitlines():
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(raw, dict) and names >= set(raw):
            try:
                record = Record(**raw)
            except TypeError:  # a record of another version of the harness
                continue
            records.pop(record.key, None)
            records[record.key] = record
    return list(records.values())


def this_machine() -> str:
    """The processor's model name and torch's thread count, e.g. "AMD EPYC, 2 threads"."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def methods_by_run(records: Iterable[Record]) -> dict[tuple[str, int], set[str]]:
    """Per (prompt, repeat): the methods that have a record for it."""
    ran: dict[tuple[str, int], set[str]] = {}
    for r in records:
        ran.setdefault((r.prompt_id, r.repeat), set()).add(r.method)
    return ran


def append_record(record: Record, path: Path) -> None:
    with path.open("a") as f:
        f.write(json.dumps(asdict(record)) + "\n")
        f.flush()


def backend_baseline(backend: str) -> Method:
    """Plain decoding on `backend`: the reference for exactness of the methods run on it."""
    return Method(
        f"none-{backend}",
        SpecConfig(drafter="none"),
        description=f"plain autoregressive decoding on the {backend} backend",
        backend=backend,
    )


def run_order(methods: Sequence[Method], backend: str) -> tuple[list[Method], dict[str, str]]:
    """The methods a run measures, baselines first, and each baseline's backend: `none` on the
    run's `backend`, and `none-OTHER` for every other backend a method names."""
    ours = [m for m in methods if m.name != BASELINE.name]
    others = sorted({m.backend for m in ours if m.backend not in (None, backend)})
    baselines = {BASELINE.name: backend} | {backend_baseline(o).name: o for o in others}
    ours = [m for m in ours if m.name not in baselines]
    return [BASELINE, *[backend_baseline(o) for o in others], *ours], baselines


class Runner:
    def __init__(
        self,
        llm: SpecDecoder,
        methods: Sequence[Method],
        sampling: SamplingParams,
        peers: dict[str, Peer] | None = None,
        backend: str = "torch",
        other_backends: dict[str, SpecDecoder] | None = None,
    ) -> None:
        """`llm` runs the baseline and every method on `backend`; `other_backends` holds the
        models for methods that name another backend."""
        self.llm = llm
        self.backend = backend
        self.decoders = {**(other_backends or {}), backend: llm}
        self.methods, self.baselines = run_order(methods, backend)
        self.sampling = sampling
        self.peers = peers or {}
        self.machine = this_machine()
        self._drafter_states: dict[tuple[str, str, int], dict] = {}
        for method in self.methods:
            if method.peer is not None and method.peer not in self.peers:
                raise SpecDecodeError(f"no runner for the peer baseline {method.peer!r}")
            if method.peer is None and self.backend_of(method) not in self.decoders:
                raise SpecDecodeError(f"no model loaded for the {method.backend} backend")

    def backend_of(self, method: Method) -> str | None:
        if method.peer is not None:
            return None
        return method.backend or self.backend

    def encode(self, prompt: Prompt) -> list[int]:
        return self.llm.encode_chat(prompt.chat())

    def run_one(
        self,
        method: Method,
        prompt_ids: list[int],
        sampling: SamplingParams,
        drafter_state: dict | None = None,
    ) -> tuple[list[int], float, dict]:
        """One generation; `drafter_state`: what the method's drafters keep across requests
        (`Engine.drafter_state`), by default a fresh one: a request sees no other's output."""
        if method.peer is not None:
            out = self.peers[method.peer].generate(
                method.peer, prompt_ids, sampling, self.llm.tokenizer.eos_token_ids
            )
            stats: dict[str, Any] = {"prefill_seconds": out.prefill_seconds}
            if out.target_forwards and out.emitted_tokens is not None:
                stats["target_forwards"] = out.target_forwards
                stats["mean_accepted_tokens"] = out.emitted_tokens / out.target_forwards
            return out.token_ids, out.seconds, stats
        backend = self.backend_of(method)
        assert backend is not None
        decoder = self.decoders[backend]
        # Every run pays for its own prefill: the backend would otherwise find the prompt that
        # the previous method left in its cache and skip it.
        decoder.target.reset()
        decoder.engine.drafter_state = {} if drafter_state is None else drafter_state
        result = decoder.generate(prompt_ids, sampling, method.spec)
        return result.token_ids, result.stats.seconds, result.stats.to_dict()

    def warm_up(self, prompt_ids: list[int]) -> None:
        """First calls allocate caches and pick kernels; keep that out of the timings."""
        short = SamplingParams(
            temperature=self.sampling.temperature,
            top_k=self.sampling.top_k,
            top_p=self.sampling.top_p,
            seed=self.sampling.seed,
            max_new_tokens=min(WARM_UP_TOKENS, self.sampling.max_new_tokens),
        )
        for method in self.methods:
            self.run_one(method, prompt_ids[-256:], short)

    def run(
        self,
        prompts: Sequence[Prompt],
        repeats: int = 1,
        sink: Callable[[Record], None] | None = None,
        done: Iterable[Record] = (),
    ) -> list[Record]:
        """Run everything not in `done`; returns the old records and the new, in run order."""
        records = list(done)
        finished = {r.key for r in records}
        baselines = {
            (self.baselines[r.method], r.prompt_id, r.repeat): r.token_ids
            for r in records
            if r.method in self.baselines
        }
        todo = [
            (prompt, repeat)
            for prompt in _categories_in_turn(prompts)
            for repeat in range(repeats)
            if any((m.name, prompt.id, repeat) not in finished for m in self.methods)
        ]
        if not todo:
            return records
        self.warm_up(self.encode(todo[0][0]))
        session_index = _session_indexes(prompts)
        for prompt, repeat in todo:
            ids = self.encode(prompt)
            for method in self.methods:
                if (method.name, prompt.id, repeat) in finished:
                    continue
                record = self._measure(method, prompt, repeat, ids, baselines)
                record.session_index = session_index.get(prompt.id)
                if method.name in self.baselines:
                    key = (self.baselines[method.name], prompt.id, repeat)
                    baselines[key] = record.token_ids
                records.append(record)
                if sink is not None:
                    sink(record)
        return records

    def _measure(
        self,
        method: Method,
        prompt: Prompt,
        repeat: int,
        ids: list[int],
        baselines: dict[tuple[str, str, int], list[int]],
    ) -> Record:
        # A session's requests share their drafters' cross-request state, in order, per method
        # and repeat (a repeat must not find its own earlier answer); other prompts start afresh.
        # A drafter whose cross-request state is the target's statistics, not text (token
        # recycling), carries it across every prompt of a repeat, as a server would.
        state = None
        if prompt.session:
            state = self._drafter_states.setdefault((method.name, prompt.session, repeat), {})
        elif method.spec is not None and DRAFTERS[method.spec.drafter].keeps_only_model_statistics(
            method.spec.drafter_options
        ):
            state = self._drafter_states.setdefault((method.name, "", repeat), {})
        with PeakMemory() as peak:
            token_ids, seconds, stats = self.run_one(method, ids, self.sampling, state)
        exact = None
        backend = self.backend_of(method)
        baseline = baselines.get((backend, prompt.id, repeat)) if backend else None
        if self.sampling.greedy and baseline is not None:
            exact = token_ids == baseline
        timed = [stats.get(k) for k in ("prefill_seconds", "drafting_seconds", "verifying_seconds")]
        other = seconds - sum(timed) if all(t is not None for t in timed) else None
        return Record(
            method=method.name,
            prompt_id=prompt.id,
            category=prompt.category,
            repeat=repeat,
            new_tokens=len(token_ids),
            seconds=seconds,
            tokens_per_second=len(token_ids) / seconds if seconds else 0.0,
            peak_memory_mb=round(peak.mb, 1),
            target_forwards=stats.get("target_forwards"),
            mean_accepted_tokens=stats.get("mean_accepted_tokens"),
            acceptance_histogram=stats.get("acceptance_histogram", []),
            acceptance_rate_by_depth=stats.get("acceptance_rate_by_depth", []),
            drafted_at_depth=stats.get("drafted_at_depth", []),
            accepted_at_depth=stats.get("accepted_at_depth", []),
            prefill_seconds=timed[0],
            drafting_seconds=timed[1],
            verifying_seconds=timed[2],
            other_seconds=other,
            draft_budget=method.budget if method.name not in self.baselines else None,
            sweep=method.sweep,
            exact=exact,
            backend=backend,
            token_ids=token_ids,
            finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            machine=self.machine,
        )


def _session_indexes(prompts: Sequence[Prompt]) -> dict[str, int]:
    """Each session prompt's place in its session (1 = first), in the suite's order."""
    counts: dict[str, int] = defaultdict(int)
    indexes = {}
    for prompt in prompts:
        if prompt.session:
            counts[prompt.session] += 1
            indexes[prompt.id] = counts[prompt.session]
    return indexes


def _categories_in_turn(prompts: Sequence[Prompt]) -> list[Prompt]:
    """The first prompt of every category, then the second of every category, and so on: a long
    run stopped early (and resumed later) has then measured every category about equally."""
    by_category: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        by_category.setdefault(prompt.category, []).append(prompt)
    queues = list(by_category.values())
    return [
        queue[i]
        for i in range(max(map(len, queues), default=0))
        for queue in queues
        if i < len(queue)
    ]
