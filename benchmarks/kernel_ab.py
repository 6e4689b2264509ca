"""Compare two versions of a row-wise kernel in one process, on one model's shapes.

A shared machine's speed drifts by tens of percent from minute to minute, so two processes run one
after the other do not compare kernels fairly. This builds two versions of `rowwise_linear.cpp`
(by default the working tree's and an earlier one from git) as two libraries, loads both, and
times them in alternation over the products of one forward of Qwen2.5-Coder-1.5B (28 layers and
the output layer, each with its own random bfloat16 weights, so that they stream from memory as a
model's do). It also checks that both give the same bits.

    python benchmarks/kernel_ab.py --baseline a59b322~1 --current a59b322
    python benchmarks/kernel_ab.py --baseline-file old_rowwise_linear.cpp --rows 1,2

With `--tiles` (on a CPU with AMX) it compares instead, in the working tree's kernel, the
dot-product path of bfloat16 rows (baseline) with the tile path (current), on weights packed once
for it: the two round differently, so it checks that they agree to float32 precision, not bits.

    python benchmarks/kernel_ab.py --tiles --rows 1,2,4,8,16

With `--kernel attention` it does the same for `rowwise_attention.cpp`: the attention of one
forward of the 1.5B (28 layers, 12 query heads on 2 key/value heads of 128) whose rows see a
cached context of `--context` tokens and, causally, each other.

Prints the median and best milliseconds per forward's products (or attention), by row count.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = Path("src/specdecode/backends/torch/kernels")  # from ROOT
# (outputs, inputs) of one layer's products: fused q/k/v, attention output, fused gate/up, down.
LAYER_SHAPES = [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)]
LAYERS = 28
VOCABULARY = 151936
QUERY_HEADS, KV_HEADS, HEAD_DIM = 12, 2, 128


def build(name: str, source: str, directory: Path, op: str):
    """Compile `source` as a library registering its ops under `name`; return its op `op`."""
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
    return getattr(getattr(torch.ops, name), op)


def source_at(revision: str, source: Path) -> str:
    """A kernel's source at a git revision (exits with one line if git cannot show it)."""
    shown = subprocess.run(
        ["git", "show", f"{revision}:{source}"], capture_output=True, text=True, cwd=ROOT
    )
    if shown.returncode != 0:
        sys.exit(f"error: cannot read {source} at {revision!r}: {shown.stderr.strip()}")
    return shown.stdout


def linear_workload():
    """A function of the row count giving one forward's products (a function of the kernel op,
    returning every product's output); the weights are made once, for all row counts."""
    import torch

    layers = [[torch.randn(shape).bfloat16() for shape in LAYER_SHAPES] for _ in range(LAYERS)]
    output_layer = torch.randn(VOCABULARY, 1536).bfloat16()
    weights = [weight for layer in layers for weight in layer] + [output_layer]

    def at(rows: int):
        inputs = {k: torch.randn(rows, k).bfloat16() for k in (1536, 8960)}
        return lambda product: [product(inputs[weight.shape[1]], weight) for weight in weights]

    return at


def attention_workload(context: int, max_rows: int):
    """As `linear_workload`, for one forward's attention after `context` cached tokens."""
    import torch

    def cache():  # [kv heads, slots, head dim], sliced to the slots in use as a model's cache is
        return torch.randn(KV_HEADS, context + max_rows, HEAD_DIM).bfloat16()

    caches = [(cache(), cache()) for _ in range(LAYERS)]
    scale = HEAD_DIM**-0.5

    def at(rows: int):
        slots = context + rows
        visible = torch.ones(rows, slots, dtype=torch.bool)  # the context, then causal
        visible[:, context:] = torch.ones(rows, rows, dtype=torch.bool).tril()
        queries = torch.randn(KV_HEADS, QUERY_HEADS // KV_HEADS * rows, HEAD_DIM)
        used = [(keys[:, :slots], values[:, :slots]) for keys, values in caches]
        return lambda attend: [attend(queries, k, v, visible, scale) for k, v in used]

    return at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--baseline", help="git revision of the earlier kernel")
    which.add_argument("--baseline-file", help="or a file holding the earlier kernel's source")
    which.add_argument(
        "--tiles",
        action="store_true",
        help="compare the working tree's dot-product and AMX tile paths (bfloat16 rows)",
    )
    parser.add_argument(
        "--current", help="git revision of the later kernel (default: the working tree's)"
    )
    parser.add_argument(
        "--kernel", choices=("linear", "attention"), default="linear", help="default: linear"
    )
    parser.add_argument("--rows", default="1,4,8,16", help="row counts, comma-separated")
    parser.add_argument(
        "--context", type=int, default=512, help="cached tokens (--kernel attention; default 512)"
    )
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        rows_list = [int(rows) for rows in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows takes integers separated by commas, got {args.rows!r}")
    if min(rows_list) < 1 or args.repeats < 1 or args.threads < 1 or args.context < 1:
        parser.error("--rows, --repeats, --threads and --context must be at least 1")
    if args.tiles:
        compare_tiles(rows_list, args.repeats, args.threads)
        return
    source = KERNELS / f"rowwise_{args.kernel}.cpp"
    op = f"rowwise_{args.kernel}"
    if args.baseline_file:
        try:
            baseline = Path(args.baseline_file).read_text()
        except OSError as error:
            sys.exit(f"error: cannot read --baseline-file: {error}")
    else:
        baseline = source_at(args.baseline, source)
    current = (
        (ROOT / source).read_text() if args.current is None else source_at(args.current, source)
    )

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            kernels = {
                "baseline": build("ab_baseline", baseline, Path(scratch) / "baseline", op),
                "current": build("ab_current", current, Path(scratch) / "current", op),
            }
        except Exception as error:  # a compiler error shows as several exception types
            sys.exit(f"error: a kernel did not compile: {str(error).strip().splitlines()[-1]}")
        if args.kernel == "linear":
            workload = linear_workload()
        else:
            workload = attention_workload(args.context, max(rows_list))
        for rows in rows_list:
            forward = workload(rows)
            # Every output of the forward, not a sample: a difference may show in a few only.
            first, second = (forward(kernel) for kernel in kernels.values())
            if not all(map(torch.equal, first, second)):
                sys.exit(f"error: the two kernels give different bits for {rows} rows")
            del first, second
            print(f"{rows} rows: " + time_alternately(forward, kernels, args.repeats))


def time_alternately(forward, kernels: dict, repeats: int) -> str:
    """Time `forward` with each kernel in turn, `repeats` rounds; median and best per kernel."""
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(repeats):
        for name, kernel in kernels.items():
            start = time.perf_counter()
            forward(kernel)
            times[name].append((time.perf_counter() - start) * 1000)
    return " | ".join(
        f"{name} median {sorted(ms)[len(ms) // 2]:.0f} best {min(ms):.0f} ms"
        for name, ms in times.items()
    )


def compare_tiles(rows_list: list[int], repeats: int, threads: int) -> None:
    """The `--tiles` comparison: dot-product path against tile path, one process."""
    import torch

    from specdecode.backends.torch import kernels

    torch.set_num_threads(threads)
    dot_product, tiles = kernels.rowwise_linear(), kernels.rowwise_linear_tiles()
    if dot_product is None or tiles is None:
        sys.exit("error: --tiles needs the kernels on a CPU with AMX that the OS lets us use")
    workload = linear_workload()
    packed: dict[int, torch.Tensor] = {}

    def by_tiles(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if id(weight) not in packed:  # once per weight, in the untimed first forward
            packed[id(weight)] = kernels.pack_for_tiles(weight)
        return tiles(x, packed[id(weight)], weight.shape[0])

    paths = {"dot-product": dot_product, "tiles": by_tiles}
    for rows in rows_list:
        forward = workload(rows)
        first, second = (forward(path) for path in paths.values())
        for a, b in zip(first, second, strict=True):
            if not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * a.abs().max().item()):
                sys.exit(f"error: the two paths disagree beyond rounding for {rows} rows")
        del first, second
        print(f"{rows} rows: " + time_alternately(forward, paths, repeats))


if __name__ == "__main__":
    main()
