"""A draft head's held-out agreement against the size of its training data, and what more data
would buy.

    python benchmarks/head_learning_curve.py HEAD_DIR... [--target 3.0] [--out DIR]

Each HEAD_DIR is a head made by `specdecode train-drafter` with the same data and settings but
for `--train-fraction` (so the held-out sequences are the same). Reads each head's provenance
(config.json), prints its trained tokens, held-out agreement by draft step and the tokens per
target forward a chain would emit at those rates (1 + a0 + a0*a1 + ...); fits each step's
agreement as a line in log2(trained tokens) and says how much data the fit needs for `--target`
tokens per forward, and how long the model takes to write it at the rate of the largest head's
data step. Writes learning_curve.png to `--out` if given.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def chain_tokens(rates: list[float]) -> float:
    total, reach = 1.0, 1.0
    for rate in rates:
        reach *= rate
        total += reach
    return total


def read(directory: Path) -> dict:
    config = json.loads((directory / "config.json").read_text())
    provenance = config["specdecode"]
    trained = provenance.get("train_tokens")
    if trained is None:  # heads made before train_tokens was recorded: every sequence but 5%
        trained = round(provenance["tokens"] * (1 - provenance["settings"]["heldout_fraction"]))
    return {
        "dir": directory,
        "trained": trained,
        "agreement": provenance["heldout_agreement_by_step"],
        "seconds": provenance["seconds"],
        "epochs": provenance["settings"]["epochs"],
        "tokens": provenance["tokens"],
    }


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - b * mx, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("heads", nargs="+", type=Path)
    parser.add_argument("--target", type=float, default=3.0, help="tokens per forward wanted")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    points = sorted((read(d) for d in args.heads), key=lambda p: p["trained"])
    if len(points) < 2:
        parser.error("a curve needs at least two heads")
    steps = min(len(p["agreement"]) for p in points)
    print("trained tokens | held-out agreement by draft step | chain tokens/forward")
    for p in points:
        rates = p["agreement"][:steps]
        print(
            f"{p['trained']:>14,} | {' '.join(f'{a:.3f}' for a in rates):>32} | "
            f"{chain_tokens(rates):.2f}"
        )
    logs = [math.log2(p["trained"]) for p in points]
    lines = [fit(logs, [p["agreement"][j] for p in points]) for j in range(steps)]
    print("per doubling of the data: " + ", ".join(f"{b:+.3f}" for _, b in lines))

    def rates_at(log_tokens: float) -> list[float]:
        return [min(1.0, max(0.0, a + b * log_tokens)) for a, b in lines]

    largest = points[-1]
    needed = None
    for tenth in range(int(logs[-1] * 10), 400):
        if chain_tokens(rates_at(tenth / 10)) >= args.target:
            needed = 2 ** (tenth / 10)
            break
    # The largest head's rates on this machine: its data step made the whole sequence set
    # (answers, prompts and text); its training went over the trained tokens `epochs` times.
    rate = largest["tokens"] / largest["seconds"]["data"]
    train_rate = largest["trained"] * largest["epochs"] / largest["seconds"]["training"]
    if needed is None:
        print(f"the fit never reaches {args.target} tokens per forward")
    else:
        factor = needed / largest["trained"]
        writing = needed / rate / 3600
        training = needed * largest["epochs"] / train_rate / 3600
        print(
            f"{args.target} tokens per forward at about {needed:,.0f} trained tokens by the fit "
            f"({factor:,.0f}x the largest head's data): {writing:,.1f} hours of the model "
            f"writing them at {rate:.0f} tokens/s and {training:,.1f} hours of training at "
            f"{train_rate:.0f} tokens/s, at the largest head's rates on this machine"
        )
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [p["trained"] for p in points]
        for j, (a, b) in enumerate(lines):
            (dots,) = ax.plot(
                xs, [p["agreement"][j] for p in points], "o", label=f"draft step {j + 1}"
            )
            ends = [logs[0], logs[-1] + 3]
            ax.plot(
                [2**e for e in ends],
                [a + b * e for e in ends],
                "--",
                linewidth=0.8,
                color=dots.get_color(),
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("trained tokens")
        ax.set_ylabel("held-out agreement with the target")
        ax.set_ylim(0, 1)
        ax.legend(fontsize="small")
        fig.tight_layout()
        args.out.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out / "learning_curve.png", dpi=110)


if __name__ == "__main__":
    main()
