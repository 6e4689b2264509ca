"""What a draft head costs beside a target forward, with and without a trimmed vocabulary.

    python benchmarks/head_costs.py [--model qwen2.5-coder-1.5b-instruct] [--kind eagle]
        [--head DIR]

Times, in one process and alternately (so that a shared machine's drift hits all alike): a target
forward of 1 token (a plain decoding step) after a context of `--context` tokens, and the head's
drafting shaped for the target with the draft vocabulary of `--head` (or 16384) and with the full
vocabulary (random weights: the cost does not depend on them):
- eagle: one draft step of the EAGLE-3 head (its decoder layer over the context, its output layer);
- medusa: one pass of the K Medusa heads, which drafts K tokens;
- hydra: the K Hydra heads one after another, each reading the tokens drafted above it.
Prints milliseconds (median of `--repeats`) per drafted token, relative to the target forward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch


def eagle_steps(args, target, config, context: torch.Tensor) -> dict[str, Callable[[], None]]:
    from specdecode.heads.attention import HeadCache
    from specdecode.heads.eagle3 import Eagle3Config, Eagle3Head, read_config

    if args.head:
        trimmed = read_config(Path(args.head), config.num_layers)
    else:
        trimmed = Eagle3Config.for_target(config, 16384)
    full = Eagle3Config(**{**trimmed.__dict__, "draft_vocab_size": config.vocab_size})
    hidden = torch.randn(1, config.hidden_size, dtype=torch.bfloat16)
    token = torch.tensor([42])
    steps = {}
    for cfg in (trimmed, full):
        head = Eagle3Head(cfg).to(torch.bfloat16).eval().requires_grad_(False)
        cache = HeadCache(cfg.num_kv_heads, cfg.head_dim, 4096, torch.bfloat16, "cpu")
        head.step(  # the context the draft step attends to
            cache,
            torch.randn(len(context), config.hidden_size, dtype=torch.bfloat16),
            target.token_embeddings(context).to(torch.bfloat16),
            torch.arange(len(context)),
        )

        def step(head=head, cache=cache) -> None:
            out = head.step(
                cache, hidden, target.token_embeddings(token), torch.tensor([len(context)])
            )
            head.logits(out).float().argmax(-1)
            cache.length = len(context)

        steps[f"head step ({cfg.draft_vocab_size})"] = step
    return steps


def state_heads_steps(args, target, config) -> dict[str, Callable[[], None]]:
    """Medusa's or Hydra's drafting of K tokens, per drafted token (the callables return K)."""
    from specdecode.heads import hydra, medusa

    module = medusa if args.kind == "medusa" else hydra
    config_class = module.MedusaConfig if args.kind == "medusa" else module.HydraConfig
    heads_class = module.MedusaHeads if args.kind == "medusa" else module.HydraHeads
    if args.head:
        directory = Path(args.head)
        trimmed = (
            medusa.read_config(directory, config)
            if args.kind == "medusa"
            else hydra.read_config(directory)
        )
    else:
        trimmed = config_class(
            config.hidden_size, config.vocab_size, 4, draft_vocab=tuple(range(16384))
        )
    full = replace(trimmed, draft_vocab=tuple(range(config.vocab_size)))
    normed = torch.randn(1, config.hidden_size, dtype=torch.bfloat16)
    steps = {}
    for cfg in (trimmed, full):
        heads = heads_class(cfg).to(torch.bfloat16).eval().requires_grad_(False)
        count = cfg.num_heads

        if args.kind == "medusa":

            def draft(heads=heads) -> None:
                heads(normed).float().argmax(-1)
        else:

            def draft(heads=heads, count=count) -> None:
                tokens = [42]
                for k in range(count):
                    embeds = target.token_embeddings(torch.tensor(tokens)).to(torch.bfloat16)
                    logits = heads.logits(k, normed, embeds[None])
                    tokens.append(int(heads.target_ids[logits.float().argmax(-1)]))

        steps[f"{count} heads, per token ({len(cfg.draft_vocab)})"] = (draft, count)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--kind", choices=("eagle", "medusa", "hydra"), default="eagle")
    parser.add_argument("--head", help="a trained head (its shape and draft vocabulary)")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from specdecode.backends.torch import TorchBackend
    from specdecode.models import load_checkpoint

    checkpoint = load_checkpoint(args.model, dtype=torch.bfloat16)
    target = TorchBackend.from_checkpoint(checkpoint, max_context=args.context + 64)
    config = checkpoint.config
    context = torch.randint(0, 30000, (args.context,))
    target.extend(context.tolist())
    if args.kind == "eagle":
        steps = {
            name: (step, 1) for name, step in eagle_steps(args, target, config, context).items()
        }
    else:
        steps = state_heads_steps(args, target, config)

    def target_step() -> None:
        target.forward(torch.tensor([42]))
        target.truncate(args.context)

    steps = {"target forward, 1 token": (target_step, 1), **steps}
    times: dict[str, list[float]] = {name: [] for name in steps}
    with torch.inference_mode():
        for _ in range(args.repeats + 3):
            for name, (step, tokens) in steps.items():
                start = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - start) / tokens)
    base = statistics.median(times["target forward, 1 token"][3:])
    print(
        f"{args.model}, {args.kind}, context {args.context}, {args.threads} threads, "
        f"median of {args.repeats}"
    )
    for name, values in times.items():
        ms = statistics.median(values[3:]) * 1000
        print(f"  {name:45s} {ms:8.2f} ms  {ms / 1000 / base:6.3f} of a target forward")


if __name__ == "__main__":
    main()
