"""What self-speculation can reach on this model and CPU: acceptance and cost by layers skipped.

For each skip ratio, the best set of sublayers `specdecode tune-skip` finds (its search, on the
same calibration answers) and its agreement with the full model; for each early exit, the same.
Then, in one process and interleaved, the time of a one-token forward through each plan against
the full model's, and the full model's forwards of 1 to 9 tokens (a verification's cost).

The bound: a chain of d drafts, each accepted with the plan's agreement a independently of the
others, emits (1 - a^(d+1)) / (1 - a) tokens per step and costs d partial forwards and one full
forward of d + 1 tokens; the best d's ratio to plain decoding is what the plan can reach at
best (later drafts agree less than the first, which the score measures, so the bench's numbers
are lower). It also prints the agreement a plan of this cost would need for 1.3x.

    python benchmarks/self_speculation_profile.py \
        --out benchmarks/results/self-speculation-profile-1.5b
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

TARGET_SPEED_UP = 1.3


def tokens_per_step(agreement: float, depth: int) -> float:
    return sum(agreement**i for i in range(depth + 1))


def best_chain(agreement: float, draft_cost: float, verify_cost: dict[int, float]) -> tuple:
    """(speed-up, depth) of the best chain length, costs relative to a one-token full forward."""
    options = [
        (tokens_per_step(agreement, depth) / (depth * draft_cost + verify_cost[depth + 1]), depth)
        for depth in range(1, max(verify_cost))
    ]
    return max(options)


def needed_agreement(draft_cost: float, verify_cost: dict[int, float]) -> float | None:
    """The least agreement at which the best chain reaches TARGET_SPEED_UP (None: none does)."""
    low, high = 0.0, 0.999
    if best_chain(high, draft_cost, verify_cost)[0] < TARGET_SPEED_UP:
        return None
    for _ in range(30):
        middle = (low + high) / 2
        if best_chain(middle, draft_cost, verify_cost)[0] >= TARGET_SPEED_UP:
            high = middle
        else:
            low = middle
    return high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--ratios", default="0.15,0.3,0.45,0.6")
    parser.add_argument("--exits", default="0.5,0.75,0.875", help="exit layers, as fractions")
    parser.add_argument("--tries", type=int, default=40, help="candidate sets per ratio")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15, help="timed forwards per plan")
    parser.add_argument("--out", required=True, help="folder for report.md, profile.json, a plot")
    args = parser.parse_args()

    import torch

    from specdecode import SpecDecoder
    from specdecode.backends.base import LayerPlan
    from specdecode.drafters.layer_search import skip_count
    from specdecode.tune_skip import calibration_scorers, mean_score, search_skips

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = SpecDecoder.load(args.model)
    target = llm.engine.target
    layers = target.num_layers
    scorers = calibration_scorers(llm, args.prompts, args.tokens, seed=0)

    rows = []  # name, plan, fraction of sublayers run, agreement
    for ratio in [float(r) for r in args.ratios.split(",")]:
        search = search_skips(scorers, layers, skip_count(layers, ratio), args.tries, seed=0)
        plan = search.best_plan
        rows.append((f"skip {ratio:.0%} of middle sublayers", plan, search.best_score))
    for fraction in [float(f) for f in args.exits.split(",")]:
        plan = LayerPlan(exit_layer=max(1, round(fraction * layers)))
        rows.append((f"exit after layer {plan.exit_layer}", plan, mean_score(scorers, plan)))

    # Costs, interleaved in one process: a one-token forward per plan, and full forwards.
    context = [(17 * i) % target.vocab_size for i in range(256)]
    target.reset()
    target.extend(context)
    start = target.num_cached
    timings: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    full_times: dict[int, list[float]] = {k: [] for k in range(1, 10)}
    one = torch.tensor([5], dtype=torch.long)
    for repeat in range(args.repeats + 1):
        for name, plan, _ in rows:
            began = time.perf_counter()
            target.forward_partial(one, plan)
            if repeat:  # the first round warms up
                timings[name].append(time.perf_counter() - began)
            target.truncate(start)
        for k in full_times:
            began = time.perf_counter()
            target.forward(torch.arange(k, dtype=torch.long) + 7)
            if repeat:
                full_times[k].append(time.perf_counter() - began)
            target.truncate(start)
    full_one = statistics.median(full_times[1])
    verify_cost = {k: statistics.median(v) / full_one for k, v in full_times.items()}

    table = []
    for name, plan, agreement in rows:
        draft_cost = statistics.median(timings[name]) / full_one
        speed_up, depth = best_chain(agreement, draft_cost, verify_cost)
        needed = needed_agreement(draft_cost, verify_cost)
        table.append(
            {
                "plan": name,
                "runs": plan.runs(layers),
                "agreement": agreement,
                "draft_cost": draft_cost,
                "bound": speed_up,
                "best_depth": depth,
                "needed_for_1.3x": needed,
                "skip_attention": sorted(plan.skip_attention),
                "skip_mlp": sorted(plan.skip_mlp),
                "exit_layer": plan.exit_layer,
            }
        )
    machine = _machine()
    record = {
        "model": args.model,
        "machine": machine,
        "full_forward_ms": full_one * 1000,
        "verify_cost": verify_cost,
        "plans": table,
        "command": " ".join(sys.argv),
    }
    (out / "profile.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"Model {args.model}, {machine}; a one-token full forward takes {full_one * 1000:.0f} ms.",
        "",
        "Full forwards of k tokens, relative to one: "
        + ", ".join(f"{k}: {cost:.2f}" for k, cost in verify_cost.items()),
        "",
        "| plan | sublayers run | agreement | draft forward / full | bound | at depth "
        "| agreement needed for 1.3x |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        needed = (
            "none reaches it" if row["needed_for_1.3x"] is None else f"{row['needed_for_1.3x']:.2f}"
        )
        lines.append(
            f"| {row['plan']} | {row['runs']:.0%} | {row['agreement']:.2f} | "
            f"{row['draft_cost']:.2f} | {row['bound']:.2f}x | {row['best_depth']} | {needed} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(table, out / "acceptance.png")


def _machine() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _plot(table: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for kind, marker in (("skip", "o"), ("exit", "s")):
        points = [row for row in table if row["plan"].startswith(kind)]
        axis.plot(
            [1 - row["runs"] for row in points],
            [row["agreement"] for row in points],
            marker=marker,
            label="sublayers skipped (searched)" if kind == "skip" else "early exit",
        )
    axis.set_xlabel("fraction of the layers' sublayers left out of the draft")
    axis.set_ylabel("first-draft agreement with the full model")
    axis.set_ylim(0, 1.05)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
