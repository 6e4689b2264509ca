"""Compare two versions of the row-wise linear kernel in one process, on one model's shapes.

A shared machine's speed drifts by tens of percent from minute to minute, so two processes run one
after the other do not compare kernels fairly. This builds two versions of `rowwise_linear.cpp`
(by default the working tree's and an earlier one from git) as two libraries, loads both, and
times them in alternation over the products of one forward of Qwen2.5-Coder-1.5B (28 layers and
the output layer, each with its own random bfloat16 weights, so that they stream from memory as a
model's do). It also checks that both give the same bits.

    python benchmarks/rowwise_linear_ab.py --baseline a59b322~1 --current a59b322
    python benchmarks/rowwise_linear_ab.py --baseline-file old_rowwise_linear.cpp --rows 1,2

Prints the median and best milliseconds per forward's products, by row count.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path("src/specdecode/backends/torch/kernels/rowwise_linear.cpp")  # from ROOT
# (outputs, inputs) of one layer's products: fused q/k/v, attention output, fused gate/up, down.
LAYER_SHAPES = [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)]
LAYERS = 28
VOCABULARY = 151936


def build(name: str, source: str, directory: Path):
    """Compile `source` as a library registering its ops under `name`; return its op."""
    import torch
    from torch.utils.cpp_extension import load

    from specdecode.backends.torch import kernels

    directory.mkdir(parents=True, exist_ok=True)
    renamed = directory / f"{name}.cpp"
    renamed.write_text(source.replace("specdecode_kernels", name))
    load(
        name=name,
        sources=[str(renamed)],
        extra_cflags=kernels.compiler_flags(),
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
    )
    return getattr(torch.ops, name).rowwise_linear


def source_at(revision: str) -> str:
    """The kernel's source at a git revision (exits with one line if git cannot show it)."""
    shown = subprocess.run(
        ["git", "show", f"{revision}:{SOURCE}"], capture_output=True, text=True, cwd=ROOT
    )
    if shown.returncode != 0:
        sys.exit(f"error: cannot read {SOURCE} at {revision!r}: {shown.stderr.strip()}")
    return shown.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--baseline", help="git revision of the earlier kernel")
    which.add_argument("--baseline-file", help="or a file holding the earlier kernel's source")
    parser.add_argument(
        "--current", help="git revision of the later kernel (default: the working tree's)"
    )
    parser.add_argument("--rows", default="1,4,8,16", help="row counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        rows_list = [int(rows) for rows in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows takes integers separated by commas, got {args.rows!r}")
    if min(rows_list) < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--rows, --repeats and --threads must be at least 1")
    if args.baseline_file:
        try:
            baseline = Path(args.baseline_file).read_text()
        except OSError as error:
            sys.exit(f"error: cannot read --baseline-file: {error}")
    else:
        baseline = source_at(args.baseline)
    current = (ROOT / SOURCE).read_text() if args.current is None else source_at(args.current)

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            products = {
                "baseline": build("ab_baseline", baseline, Path(scratch) / "baseline"),
                "current": build("ab_current", current, Path(scratch) / "current"),
            }
        except Exception as error:  # a compiler error shows as several exception types
            sys.exit(f"error: a kernel did not compile: {str(error).strip().splitlines()[-1]}")
        layers = [[torch.randn(shape).bfloat16() for shape in LAYER_SHAPES] for _ in range(LAYERS)]
        output_layer = torch.randn(VOCABULARY, 1536).bfloat16()
        weights = [weight for layer in layers for weight in layer] + [output_layer]
        for rows in rows_list:
            inputs = {k: torch.randn(rows, k).bfloat16() for k in (1536, 8960)}
            first, second = (product(inputs[1536], output_layer) for product in products.values())
            if not torch.equal(first, second):
                sys.exit(f"error: the two kernels give different bits for {rows} rows")
            times: dict[str, list[float]] = {name: [] for name in products}
            for _ in range(args.repeats):
                for name, product in products.items():
                    start = time.perf_counter()
                    for weight in weights:
                        product(inputs[weight.shape[1]], weight)
                    times[name].append((time.perf_counter() - start) * 1000)
            cells = [
                f"{name} median {sorted(ms)[len(ms) // 2]:.0f} best {min(ms):.0f} ms"
                for name, ms in times.items()
            ]
            print(f"{rows} rows: " + " | ".join(cells))


if __name__ == "__main__":
    main()
