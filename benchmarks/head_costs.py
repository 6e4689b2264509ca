"""What a draft head's step costs beside a target forward, with and without a trimmed vocabulary.

    python benchmarks/head_costs.py [--model qwen2.5-coder-1.5b-instruct] [--head DIR]

Times, in one process and alternately (so that a shared machine's drift hits all alike): a target
forward of 1 token (a plain decoding step) after a context of `--context` tokens; one draft step of
an EAGLE-3 head shaped for the target with the draft vocabulary of `--head` (or 16384) and with the
full vocabulary (random weights: the cost does not depend on them). Prints milliseconds (median of
`--repeats`) and each head step relative to the target forward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--head", help="a trained head (its shape and draft vocabulary)")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pathlib import Path

    from specdecode.backends.torch import TorchBackend
    from specdecode.heads.eagle3 import Eagle3Config, Eagle3Head, HeadCache, read_config
    from specdecode.models import load_checkpoint

    checkpoint = load_checkpoint(args.model, dtype=torch.bfloat16)
    target = TorchBackend.from_checkpoint(checkpoint, max_context=args.context + 64)
    config = checkpoint.config
    if args.head:
        trimmed = read_config(Path(args.head), config.num_layers)
    else:
        trimmed = Eagle3Config.for_target(config, 16384)
    full = Eagle3Config(**{**trimmed.__dict__, "draft_vocab_size": config.vocab_size})
    heads = {}
    for name, cfg in (("head, trimmed vocabulary", trimmed), ("head, full vocabulary", full)):
        head = Eagle3Head(cfg).to(torch.bfloat16).eval().requires_grad_(False)
        cache = HeadCache(cfg, 4096, torch.bfloat16, "cpu")
        heads[f"{name} ({cfg.draft_vocab_size})"] = (head, cache)
    context = torch.randint(0, 30000, (args.context,))
    target.extend(context.tolist())
    hidden = torch.randn(1, config.hidden_size, dtype=torch.bfloat16)
    token = torch.tensor([42])
    times: dict[str, list[float]] = {"target forward, 1 token": []}
    times.update({name: [] for name in heads})
    with torch.inference_mode():
        for head, cache in heads.values():  # each head's cache holds the same context
            cache.step(
                head,
                torch.randn(args.context, config.hidden_size, dtype=torch.bfloat16),
                target.token_embeddings(context).to(torch.bfloat16),
                torch.arange(args.context),
            )
        for _ in range(args.repeats + 3):
            start = time.perf_counter()
            target.forward(token)
            times["target forward, 1 token"].append(time.perf_counter() - start)
            target.truncate(args.context)
            for name, (head, cache) in heads.items():
                start = time.perf_counter()
                out = cache.step(
                    head, hidden, target.token_embeddings(token), torch.tensor([args.context])
                )
                head.logits(out).float().argmax(-1)
                times[name].append(time.perf_counter() - start)
                cache.length = args.context
    base = statistics.median(times["target forward, 1 token"][3:])
    print(f"{args.model}, context {args.context}, {args.threads} threads, median of {args.repeats}")
    for name, values in times.items():
        ms = statistics.median(values[3:]) * 1000
        print(f"  {name:45s} {ms:8.2f} ms  {ms / 1000 / base:6.3f} of a target forward")


if __name__ == "__main__":
    main()
