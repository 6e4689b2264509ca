"""Plain decoding with the AMX tile kernel against the dot-product kernel, in one process.

    python benchmarks/tiles_plain_decoding.py [--rounds 2] [--max-new-tokens 64]

On a CPU with AMX, loads the 1.5B once, packs its weights for the tiles, then generates every
third prompt of the quick suite with plain decoding, switching the kernel that
`SPECDECODE_TILES` would fix for a process between generations (the order alternating by round),
and prints tokens/s per generation and the means. Two processes run one after the other on a
shared machine differ by more than the kernels do; interleaved generations in one process do not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "src/specdecode/bench/data/quick.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.rounds < 1 or args.max_new_tokens < 1:
        parser.error("--rounds and --max-new-tokens must be at least 1")

    import torch

    from specdecode import SamplingParams, SpecConfig, SpecDecoder
    from specdecode.backends.torch import kernels

    if kernels.rowwise_linear_tiles() is None:
        sys.exit("error: this needs a CPU with AMX tile instructions that the OS lets us use")
    torch.set_num_threads(2)
    records = [json.loads(line) for line in SUITE.read_text().splitlines()][::3]
    prompts = [r["messages"][-1]["content"] if "messages" in r else r["prompt"] for r in records]
    llm = SpecDecoder.load(args.model)
    plain = SpecConfig(drafter="none")
    kernels._state["tiles_chosen"] = True
    llm.generate(prompts[0], SamplingParams(max_new_tokens=4), plain)  # packs, untimed
    rates: dict[bool, list[float]] = {True: [], False: []}
    for round_index in range(args.rounds):
        order = (True, False) if round_index % 2 == 0 else (False, True)
        for prompt in prompts:
            for tiles in order:
                kernels._state["tiles_chosen"] = tiles
                result = llm.generate(
                    prompt, SamplingParams(max_new_tokens=args.max_new_tokens), plain
                )
                rates[tiles].append(result.stats.tokens_per_second)
                name = "tiles" if tiles else "dot-product"
                print(f"{name:>11}  {result.stats.tokens_per_second:.2f} tokens/s", flush=True)
    for tiles, values in rates.items():
        name = "tiles" if tiles else "dot-product"
        print(f"{name:>11}  mean {sum(values) / len(values):.2f} tokens/s over {len(values)}")


if __name__ == "__main__":
    main()
