"""Run methods on prompts, interleaved with the baseline, and report speed-ups as ratios.

For each prompt and repeat the baseline (plain decoding through the same engine) runs first, then
every method, so slow drift of a shared machine hits all of them alike and cancels in the ratios.
One untimed warm-up generation per method comes first. Greedy outputs of our methods are compared
token for token with the baseline's: a mismatch is a bug and is reported first.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from specdecode.api import SpecDecoder
from specdecode.bench.methods import BASELINE, Method
from specdecode.bench.peers import HFPeer
from specdecode.config import SamplingParams


@dataclass
class Prompt:
    id: str
    category: str
    prompt: str
    origin: str = ""


@dataclass
class Record:
    method: str
    prompt_id: str
    category: str
    repeat: int
    new_tokens: int
    seconds: float
    tokens_per_second: float
    target_forwards: int | None = None
    mean_accepted_tokens: float | None = None
    acceptance_histogram: list[int] = field(default_factory=list)
    acceptance_rate_by_depth: list[float] = field(default_factory=list)
    drafting_seconds: float | None = None
    verifying_seconds: float | None = None
    exact: bool | None = None  # greedy output equals the baseline's, token for token
    token_ids: list[int] = field(default_factory=list)


def load_prompts(path: Path, categories: Sequence[str] | None = None) -> list[Prompt]:
    prompts = [Prompt(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    if categories:
        prompts = [p for p in prompts if p.category in categories]
    return prompts


class Runner:
    def __init__(
        self,
        llm: SpecDecoder,
        methods: Sequence[Method],
        sampling: SamplingParams,
        peer: HFPeer | None = None,
    ) -> None:
        self.llm = llm
        self.methods = [BASELINE] + [m for m in methods if m.name != BASELINE.name]
        self.sampling = sampling
        self.peer = peer

    def run_one(self, method: Method, prompt_ids: list[int]) -> tuple[list[int], float, dict]:
        if method.peer is not None:
            assert self.peer is not None
            out = self.peer.generate(
                method.peer,
                prompt_ids,
                self.sampling.max_new_tokens,
                self.llm.tokenizer.eos_token_ids,
            )
            return out.token_ids, out.seconds, {}
        result = self.llm.generate(prompt_ids, self.sampling, method.spec)
        return result.token_ids, result.stats.seconds, result.stats.to_dict()

    def run(
        self,
        prompts: Sequence[Prompt],
        repeats: int = 1,
        on_record: Callable[[Record], None] | None = None,
    ) -> list[Record]:
        encoded = [self.llm.encode_prompt(p.prompt) for p in prompts]
        for method in self.methods:  # warm-up: first calls allocate and tune kernels
            self.run_one(method, encoded[0][:64] if len(encoded[0]) > 64 else encoded[0])
        records: list[Record] = []
        for prompt, ids in zip(prompts, encoded, strict=True):
            for repeat in range(repeats):
                baseline_ids: list[int] | None = None
                for method in self.methods:
                    token_ids, seconds, stats = self.run_one(method, ids)
                    if method is self.methods[0]:
                        baseline_ids = token_ids
                    exact = None
                    if self.sampling.greedy and method.peer is None:
                        exact = token_ids == baseline_ids
                    record = Record(
                        method=method.name,
                        prompt_id=prompt.id,
                        category=prompt.category,
                        repeat=repeat,
                        new_tokens=len(token_ids),
                        seconds=seconds,
                        tokens_per_second=len(token_ids) / seconds if seconds else 0.0,
                        target_forwards=stats.get("target_forwards"),
                        mean_accepted_tokens=stats.get("mean_accepted_tokens"),
                        acceptance_histogram=stats.get("acceptance_histogram", []),
                        acceptance_rate_by_depth=stats.get("acceptance_rate_by_depth", []),
                        drafting_seconds=stats.get("drafting_seconds"),
                        verifying_seconds=stats.get("verifying_seconds"),
                        exact=exact,
                        token_ids=token_ids,
                    )
                    records.append(record)
                    if on_record:
                        on_record(record)
        return records


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def speedups(records: Sequence[Record]) -> dict[tuple[str, str], list[float]]:
    """Per (category, method): the ratios of its tokens/s to the baseline's, run by run."""
    baseline = {
        (r.prompt_id, r.repeat): r.tokens_per_second for r in records if r.method == BASELINE.name
    }
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        base = baseline.get((r.prompt_id, r.repeat))
        if base and r.tokens_per_second > 0:
            ratios[(r.category, r.method)].append(r.tokens_per_second / base)
            ratios[("overall", r.method)].append(r.tokens_per_second / base)
    return ratios


def report(records: Sequence[Record], command: str) -> str:
    lines = []
    mismatches = [r for r in records if r.exact is False]
    if mismatches:
        lines.append("## EXACTNESS MISMATCHES\n")
        for r in mismatches:
            lines.append(
                f"- **{r.method}** on `{r.prompt_id}` (repeat {r.repeat}) differs "
                "from plain decoding"
            )
        lines.append("")
    ratios = speedups(records)
    methods = list(dict.fromkeys(r.method for r in records))
    categories = list(dict.fromkeys(r.category for r in records)) + ["overall"]
    lines.append("| category | method | speed-up | tokens/s | tokens/forward | exact |")
    lines.append("|---|---|---|---|---|---|")
    for category in categories:
        for method in methods:
            rows = [
                r
                for r in records
                if r.method == method and (category == "overall" or r.category == category)
            ]
            if not rows:
                continue
            tps = sum(r.tokens_per_second for r in rows) / len(rows)
            mat = [r.mean_accepted_tokens for r in rows if r.mean_accepted_tokens is not None]
            exact = [r.exact for r in rows if r.exact is not None]
            speedup = geometric_mean(ratios[(category, method)])
            per_forward = f"{sum(mat) / len(mat):.2f}" if mat else "-"
            exact_cell = "-" if not exact else ("yes" if all(exact) else "NO")
            lines.append(
                f"| {category} | {method} | {speedup:.2f}x | {tps:.2f} | {per_forward} "
                f"| {exact_cell} |"
            )
    lines.append("")
    lines.append(
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.platform()}; torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}."
    )
    lines.append(f"Command: `{command}`")
    return "\n".join(lines)


def write_records(records: Sequence[Record], path: Path) -> None:
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
