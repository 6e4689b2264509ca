"""Time the torch backend's forwards of 1 to 32 tokens (after a short context), for the README.

    python benchmarks/torch_forward_costs.py                       # the row-wise kernels
    SPECDECODE_KERNELS=0 python benchmarks/torch_forward_costs.py  # library products
    python benchmarks/torch_forward_costs.py --model qwen2.5-coder-0.5b-instruct --quantize int8
                                                                   # the draft model, as drafted

Prints milliseconds per forward by token count (best of a few runs each, as the cost-aware
controller measures them: `specdecode.control.cost_curve.measure`).
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--quantize", default="none", choices=("none", "int8"), help="int8: as a draft model runs"
    )
    args = parser.parse_args()

    import torch

    from specdecode.backends.torch import TorchBackend
    from specdecode.control.cost_curve import measure
    from specdecode.models import load_checkpoint

    torch.set_num_threads(args.threads)
    quantize = None if args.quantize == "none" else args.quantize
    dtype = getattr(torch, args.dtype)
    checkpoint = load_checkpoint(args.model, dtype=dtype)
    model = TorchBackend.from_checkpoint(checkpoint, dtype=dtype, quantize=quantize)
    tokens = (1, 2, 4, 8, 16, 32)
    seconds = measure(model, tuple(count - 1 for count in tokens))
    print(" | ".join(f"{count}: {seconds[count - 1] * 1000:.0f} ms" for count in tokens))


if __name__ == "__main__":
    main()
