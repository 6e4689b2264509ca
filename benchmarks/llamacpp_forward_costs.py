"""Time llama.cpp forwards of 1 to 32 tokens and a prompt prefill, on each kind of kernels.

    python benchmarks/llamacpp_forward_costs.py --kernels matched  # --backend llamacpp-matched
    python benchmarks/llamacpp_forward_costs.py --kernels narrow   # --backend llamacpp-narrow
    python benchmarks/llamacpp_forward_costs.py --kernels wide     # --backend llamacpp-wide
    python benchmarks/llamacpp_forward_costs.py --kernels stock    # --backend llamacpp-stock

(`--backend llamacpp` picks matched for files they cover, else narrow.) Prints one Markdown table
row (best of 3 per width, after a context of --context random tokens).
"""

from __future__ import annotations

import argparse
import time

from specdecode.backends.llamacpp import KERNELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", choices=KERNELS, required=True)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--context", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from specdecode.backends.llamacpp import LlamaCppBackend
    from specdecode.models import resolve_gguf

    backend = LlamaCppBackend(
        resolve_gguf(args.model),
        threads=args.threads,
        max_context=args.context + 64,
        kernels=args.kernels,
    )
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(100, 20000, (args.context,), generator=generator).tolist()
    drafts = torch.randint(100, 20000, (32,), generator=generator)
    cells = []
    backend.extend(context)
    for width in (1, 2, 3, 4, 8, 16, 32):
        seconds = []
        for _ in range(3):
            backend.truncate(len(context))
            started = time.perf_counter()
            backend.forward(drafts[:width])
            seconds.append(time.perf_counter() - started)
        cells.append(f"{min(seconds) * 1000:.0f} ms")
    prefill = []
    for _ in range(2):
        backend.reset()
        started = time.perf_counter()
        backend.extend(context)
        prefill.append(time.perf_counter() - started)
    cells.append(f"{min(prefill):.1f} s")
    print(f"| `{args.kernels}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
