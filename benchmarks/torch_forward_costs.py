"""Time the torch backend's forwards of 1 to 32 tokens (after a short context), for the README.

    python benchmarks/torch_forward_costs.py                       # the row-wise kernels
    SPECDECODE_KERNELS=0 python benchmarks/torch_forward_costs.py  # library products
    python benchmarks/torch_forward_costs.py --model qwen2.5-coder-0.5b-instruct --quantize int8
                                                                   # the draft model, as drafted

Prints milliseconds per forward by token count (best of a few runs each, as the cost-aware
controller measures them: `specdecode.control.cost_curve.measure`).

    python benchmarks/torch_forward_costs.py --profile 16 --context 1024

instead profiles forwards of 16 tokens after a context of 1024 and prints where their time goes,
by operator (self time, torch's profiler), to find the work outside the matrix products.

    python benchmarks/torch_forward_costs.py --compare-tiles 3

on a CPU with AMX times the forwards with the products on the AMX tile kernel and on the
dot-product kernel (`SPECDECODE_TILES`), alternately in one process, for 3 rounds: two processes
run one after the other on a shared machine differ by more than the kernels do.
"""

from __future__ import annotations

import argparse
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--quantize", default="none", choices=("none", "int8"), help="int8: as a draft model runs"
    )
    parser.add_argument(
        "--profile", type=int, metavar="TOKENS", help="profile forwards of this many tokens"
    )
    parser.add_argument(
        "--context", type=int, default=128, help="tokens already cached (--profile; default 128)"
    )
    parser.add_argument(
        "--compare-tiles",
        type=int,
        metavar="ROUNDS",
        help="alternate the AMX tile kernel and the dot-product kernel, ROUNDS times each",
    )
    args = parser.parse_args()
    if args.profile is not None and not 1 <= args.profile <= 128:
        parser.error("--profile takes a token count from 1 to 128 (the row-wise kernels' range)")
    if args.context < 1:
        parser.error("--context must be at least 1")
    if args.compare_tiles is not None and args.compare_tiles < 1:
        parser.error("--compare-tiles takes a number of rounds, at least 1")

    import torch

    from specdecode.backends.torch import TorchBackend
    from specdecode.control.cost_curve import measure
    from specdecode.models import load_checkpoint

    torch.set_num_threads(args.threads)
    quantize = None if args.quantize == "none" else args.quantize
    dtype = getattr(torch, args.dtype)
    checkpoint = load_checkpoint(args.model, dtype=dtype)
    model = TorchBackend.from_checkpoint(checkpoint, dtype=dtype, quantize=quantize)
    if args.profile is not None:
        profile(model, args.profile, args.context)
        return
    tokens = (1, 2, 4, 8, 16, 32)
    if args.compare_tiles is None:
        seconds = measure(model, tuple(count - 1 for count in tokens))
        print(" | ".join(f"{count}: {seconds[count - 1] * 1000:.0f} ms" for count in tokens))
        return
    from specdecode.backends.torch import kernels

    if kernels.rowwise_linear_tiles() is None or args.dtype != "bfloat16" or quantize:
        sys.exit("error: --compare-tiles needs a CPU with AMX and a bfloat16 model (no --quantize)")
    for _ in range(args.compare_tiles):
        for tiles in (True, False):
            # What SPECDECODE_TILES decides once per process, switched here between rounds.
            kernels._state["tiles_chosen"] = tiles
            seconds = measure(model, tuple(count - 1 for count in tokens))
            cells = " | ".join(f"{count}: {seconds[count - 1] * 1000:.0f} ms" for count in tokens)
            print(f"{'tiles' if tiles else 'dot-product':>11}  {cells}", flush=True)


def profile(model, tokens: int, context: int, forwards: int = 5) -> None:
    """Print the operators that take the time of `forwards` forwards of `tokens` tokens."""
    import time

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ids = [(17 * i) % model.vocab_size for i in range(context + tokens)]
    with torch.inference_mode():
        model.reset()
        model.extend(ids[:context])
        batch = torch.tensor(ids[context:], dtype=torch.long)
        model.forward(batch)  # warm-up: kernels compiled, caches touched
        model.truncate(context)
        start = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU]) as trace:
            for _ in range(forwards):
                model.forward(batch)
                model.truncate(context)
        wall = (time.perf_counter() - start) / forwards
    print(f"{tokens} tokens after {context}: {wall * 1000:.0f} ms per forward (profiled)")
    print(trace.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
