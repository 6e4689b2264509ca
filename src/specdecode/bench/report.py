"""Turn benchmark records into `report.md` and PNG plots.

Speed-up is the geometric mean, over prompts and repeats, of a method's tokens/s divided by the
baseline's on the same prompt and repeat (runs that were interleaved, so machine drift cancels).
Exactness mismatches come first and loudly: under greedy decoding any of them is a bug.
"""

from __future__ import annotations

import contextlib
import math
import platform
import sys
from collections import defaultdict
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch

from specdecode.bench.methods import BASELINE
from specdecode.bench.runner import Record, this_machine

OVERALL = "overall"


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def speedups(
    records: Sequence[Record], decode_only: bool = False
) -> dict[tuple[str, str], list[float]]:
    """Per (category, method), and per ("overall", method): ratios to the baseline's tokens/s
    (with `decode_only`, of tokens/s after the prefill)."""

    def rate(record: Record) -> float | None:
        return record.decode_tokens_per_second if decode_only else record.tokens_per_second

    baseline = {(r.prompt_id, r.repeat): rate(r) for r in records if r.method == BASELINE.name}
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        base, own = baseline.get((r.prompt_id, r.repeat)), rate(r)
        if base and own:
            ratios[(r.category, r.method)].append(own / base)
            ratios[(OVERALL, r.method)].append(own / base)
    return ratios


def _ratio(values: Sequence[float]) -> str:
    return f"{geometric_mean(values):.2f}x" if values else "-"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _table(records: Sequence[Record], category: str, ratios, decode_ratios) -> list[str]:
    lines = [
        "| method | speed-up | decode speed-up | tokens/s | tokens/forward | drafted accepted "
        "| peak MB | exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r.method for r in records):
        rows = [r for r in records if r.method == method and category in (OVERALL, r.category)]
        if not rows:
            continue
        tps = _mean([r.tokens_per_second for r in rows])
        per_forward = _mean([r.mean_accepted_tokens for r in rows if r.target_forwards])
        depth_rates = [rate for r in rows for rate in r.acceptance_rate_by_depth[:1]]
        first_rate = _mean(depth_rates)
        exact = [r.exact for r in rows if r.exact is not None]
        cells = [
            f"`{method}`",
            f"{geometric_mean(ratios.get((category, method), [])):.2f}x",
            _ratio(decode_ratios.get((category, method), [])),
            f"{tps:.2f}",
            "-" if per_forward is None else f"{per_forward:.2f}",
            "-" if first_rate is None else f"{first_rate:.0%} of first drafts",
            f"{max(r.peak_memory_mb for r in rows):.0f}",
            "-" if not exact else ("yes" if all(exact) else f"**NO** ({exact.count(False)})"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _by_category(records: Sequence[Record], ratios) -> list[str]:
    """One row per method: its speed-up in every category, overall, and its mean tokens/s."""
    categories = list(dict.fromkeys(r.category for r in records))
    lines = [
        "| method | " + " | ".join(categories) + f" | {OVERALL} | tokens/s |",
        "|---" * (len(categories) + 3) + "|",
    ]
    for method in dict.fromkeys(r.method for r in records):
        cells = [_ratio(ratios.get((c, method), [])) for c in [*categories, OVERALL]]
        tps = _mean([r.tokens_per_second for r in records if r.method == method])
        lines.append(f"| `{method}` | " + " | ".join(cells) + f" | {tps:.2f} |")
    return lines


def machine_description(records: Sequence[Record] = ()) -> str:
    """The machine(s) the records ran on (this one for records that do not say), and the
    versions of the software writing the report."""
    counts: dict[str, int] = {}
    for r in records:
        machine = r.machine or this_machine()
        counts[machine] = counts.get(machine, 0) + 1
    if len(counts) > 1:
        where = "; ".join(f"{m} ({n} records)" for m, n in counts.items())
    else:
        where = next(iter(counts), this_machine())
    versions = [f"Python {sys.version.split()[0]}", f"torch {torch.__version__}"]
    try:
        import transformers

        versions.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    with contextlib.suppress(metadata.PackageNotFoundError):
        versions.append(f"llama-cpp-python {metadata.version('llama_cpp_python')}")
    from specdecode import __version__

    versions.append(f"specdecode {__version__}")
    return f"{where}, {platform.system()} {platform.release()}; " + ", ".join(versions)


def report(records: Sequence[Record], command: str, settings: str = "") -> str:
    lines = ["# specdecode benchmark", ""]
    mismatches = [r for r in records if r.exact is False]
    if mismatches:
        lines += ["## EXACTNESS MISMATCHES: greedy output differs from plain decoding", ""]
        lines += [f"- **{r.method}** on `{r.prompt_id}` (repeat {r.repeat})" for r in mismatches]
        lines.append("")
    ratios = speedups(records)
    decode_ratios = speedups(records, decode_only=True)
    if settings:
        lines += [settings, ""]
    lines += [
        "Speed-up: geometric mean over prompts of tokens/s relative to `none` (plain decoding "
        "through the same engine) on the same prompt, run interleaved. tokens/forward: tokens "
        "emitted per target forward pass. Seconds include prompt prefill; decode speed-up is the "
        "same ratio over the seconds after it (a peer's prefill: until its first token), as "
        "llama.cpp reports prompt and generation speeds apart.",
        "",
    ]
    backends = sorted({r.backend for r in records if r.backend})
    if len(backends) > 1:
        lines += [
            f"Backends: {', '.join(backends)}. Exactness is token identity with plain decoding "
            "on the method's own backend (`none-BACKEND`); speed-ups are all relative to `none`.",
            "",
        ]
    lines += [
        "## Overall",
        "",
        *_table(records, OVERALL, ratios, decode_ratios),
        "",
    ]
    if len({r.category for r in records}) > 1:
        lines += ["## Speed-up by category", "", *_by_category(records, ratios), ""]
    for category in dict.fromkeys(r.category for r in records):
        lines += [f"## {category}", "", *_table(records, category, ratios, decode_ratios), ""]
    lines += _by_session_index(records)
    lines += [f"Machine: {machine_description(records)}.", "", f"Command: `{command}`", ""]
    return "\n".join(lines)


def _by_session_index(records: Sequence[Record]) -> list[str]:
    """Tokens per forward by the request's place in its session: what drafters that learn across
    requests gain as a session goes on (no lines when no record is part of a session)."""
    totals: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in records:
        baseline = r.method == BASELINE.name or r.method.startswith(f"{BASELINE.name}-")
        if r.session_index is not None and r.target_forwards and not baseline:
            total = totals[r.method][r.session_index]
            total[0] += r.new_tokens
            total[1] += r.target_forwards
    if not totals:
        return []
    indexes = sorted({i for by_index in totals.values() for i in by_index})
    lines = [
        "## Tokens per forward by request in its session",
        "",
        "Emitted tokens over target forwards, summed over the sessions' requests at each place "
        "(1 = a session's first request, which has learned nothing from earlier ones).",
        "",
        "| method | " + " | ".join(f"request {i}" for i in indexes) + " |",
        "|---" * (len(indexes) + 1) + "|",
    ]
    for method, by_index in totals.items():
        cells = [
            f"{by_index[i][0] / by_index[i][1]:.2f}" if by_index[i][1] else "-" for i in indexes
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def acceptance_by_depth(records: Sequence[Record], min_drafted: int = 20) -> dict[str, list[float]]:
    """Per method, the share of target forwards drafting depth d+1 that accepted it, over all
    its records (depths drafted fewer than `min_drafted` times are left off: too few to read)."""
    drafted: dict[str, list[int]] = defaultdict(list)
    accepted: dict[str, list[int]] = defaultdict(list)
    for r in records:
        for counts, into in ((r.drafted_at_depth, drafted), (r.accepted_at_depth, accepted)):
            total = into[r.method]
            total += [0] * (len(counts) - len(total))
            for d, n in enumerate(counts):
                total[d] += n
    rates = {}
    for method, totals in drafted.items():
        hits = accepted[method] + [0] * len(totals)
        shown = []
        for d, n in enumerate(totals):
            if n < min_drafted:
                break
            shown.append(hits[d] / n)
        if shown:
            rates[method] = shown
    return rates


def plot(records: Sequence[Record], out_dir: Path) -> list[Path]:
    """speedup.png, accepted.png, depth.png (acceptance by draft depth) and, when a sweep ran,
    budget.png; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ratios = speedups(records)
    methods = [m for m in dict.fromkeys(r.method for r in records) if m != BASELINE.name]
    categories = [*dict.fromkeys(r.category for r in records), OVERALL]
    # The default cycle has 10 colours; a reference run compares more methods than that, and a
    # repeated colour makes two methods' bars indistinguishable.
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    if methods:
        group_width = max(1.4, 0.12 * len(methods))
        fig, ax = plt.subplots(figsize=(max(6, group_width * len(categories)), 4.5))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            values = [geometric_mean(ratios.get((c, method), [])) for c in categories]
            positions = [x + i * width for x in range(len(categories))]
            ax.bar(positions, values, width, label=method, color=colors[method])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(categories))], categories)
        # Category names are long ("math-reasoning"); tilted, they do not run into each other.
        ax.tick_params(axis="x", labelrotation=20)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
        ax.set_ylabel("speed-up over plain decoding")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        written.append(_save(fig, out_dir / "speedup.png"))

    histograms = {}
    for method in methods:
        total: list[int] = []
        for r in records:
            if r.method == method:
                for i, n in enumerate(r.acceptance_histogram):
                    total += [0] * (i + 1 - len(total))
                    total[i] += n
        if sum(total):
            histograms[method] = [n / sum(total) for n in total]
    if histograms:
        fig, ax = plt.subplots(figsize=(9, 4))
        for method, shares in histograms.items():
            ax.plot(range(len(shares)), shares, marker="o", label=method, color=colors[method])
        ax.set_xlabel("drafted tokens accepted in a forward")
        ax.set_ylabel("share of target forwards")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        written.append(_save(fig, out_dir / "accepted.png"))

    by_depth = acceptance_by_depth(records)
    if by_depth:
        fig, ax = plt.subplots(figsize=(9, 4))
        for method, rates in by_depth.items():
            depths = range(1, len(rates) + 1)
            ax.plot(depths, rates, marker="o", label=method, color=colors[method])
        ax.set_xlabel("draft depth (token d of the draft)")
        ax.set_ylabel("accepted, of the forwards drafting it")
        ax.set_ylim(0, 1)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        written.append(_save(fig, out_dir / "depth.png"))

    sweeps: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.sweep is not None and r.draft_budget is not None:
            sweeps[r.sweep][r.draft_budget].append(r.tokens_per_second)
    sweeps = {name: points for name, points in sweeps.items() if len(points) > 1}
    if sweeps:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, points in sweeps.items():
            budgets = sorted(points)
            ax.plot(budgets, [_mean(points[b]) for b in budgets], marker="o", label=name)
        base = _mean([r.tokens_per_second for r in records if r.method == BASELINE.name])
        if base:
            ax.axhline(base, color="black", linewidth=0.8, label="plain decoding")
        ax.set_xlabel("draft tokens per forward")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize="small")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "budget.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
