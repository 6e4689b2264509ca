"""Replay draft-model chains and trees over recorded greedy outputs, without the target model.

Greedy decoding is deterministic, so the token ids that plain decoding wrote into a benchmark run's
`results.jsonl` (method `none`) are what every exact method emits. `ReplayTarget` stands in for
the target: after any text that agrees with the recorded output its argmax is the next recorded
token. The real engine, drafters, tree shapes and verifiers then run every method of a methods
file as they would against the target, and count the same target forwards, while only the draft
model computes. A cheap way to compare tree shapes and budgets by tokens per forward before a
benchmark run; time is not measured (the stand-in costs nothing), and methods whose controller
plans from the target's measured costs (`cost-aware`) are left out.

    python benchmarks/replay_trees.py \\
        benchmarks/results/reference-spec-bench-1.5b-greedy-ddec75f/results.jsonl \\
        --suite spec-bench --methods benchmarks/methods/trees-vs-chains.toml
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from specdecode.backends.base import Backend
from specdecode.bench.methods import Method, load_methods_file
from specdecode.config import SamplingParams
from specdecode.engine import Engine
from specdecode.errors import SpecDecodeError
from specdecode.models import load_tokenizer

# The recorded outputs and the draft model are read as the bound on trees reads them.
sys.path.insert(0, str(Path(__file__).parent))
from tree_headroom import add_recorded_output_options, load_draft, read_recorded_outputs  # noqa: E402


class ReplayTarget(Backend):
    """A target whose greedy continuation of `prompt` is `output`.

    Its cache holds token ids; each new token sees the cached ones the tree mask lets it see. Off
    the recorded path its logits are all zero: the greedy walk never gets there, since a node is
    accepted only when it is the argmax of an accepted parent."""

    def __init__(
        self, vocab_size: int, prompt: Sequence[int], output: Sequence[int], max_context: int
    ) -> None:
        super().__init__(vocab_size, max_context)
        self.prompt_length = len(prompt)
        self.output = list(output)
        self.cache: list[int] = []

    @property
    def num_cached(self) -> int:
        return len(self.cache)

    def forward(self, token_ids, positions=None, tree_mask=None, return_logits=True):
        ids = token_ids.tolist()
        count = len(ids)
        if not return_logits:
            self.cache.extend(ids)
            return None
        if tree_mask is None:
            tree_mask = torch.ones(count, count, dtype=torch.bool).tril()
        span = tree_mask.shape[1]  # the mask also covers the last span - count cached tokens
        settled = len(self.cache) - (span - count)
        window = self.cache[settled:] + ids
        logits = torch.zeros(count, self.vocab_size)  # [T, V]
        for row in range(count):
            seen = [window[j] for j in range(span) if tree_mask[row, j]]
            generated = (self.cache[:settled] + seen)[self.prompt_length :]
            done = len(generated)
            if done < len(self.output) and generated == self.output[:done]:
                logits[row, self.output[done]] = 1.0
        self.cache.extend(ids)
        return logits

    def truncate(self, length: int) -> None:
        del self.cache[length:]

    def keep(self, start: int, offsets: Sequence[int]) -> None:
        self.cache[start:] = [self.cache[start + offset] for offset in offsets]


def replayable(methods: list[Method]) -> list[Method]:
    """The methods of our engine on the torch backend whose steps do not depend on timing."""
    kept = []
    for method in methods:
        spec = method.spec
        if spec is None or method.backend not in (None, "torch") or spec.drafter == "none":
            continue
        if spec.controller == "cost-aware":
            print(f"skipping {method.name}: it plans from the target's measured costs")
            continue
        kept.append(method)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recorded_output_options(parser)
    parser.add_argument("--methods", required=True, help="a methods file (TOML)")
    parser.add_argument("--only", help="replay only these methods of the file (comma-separated)")
    args = parser.parse_args()

    try:
        methods = replayable(load_methods_file(Path(args.methods)))
        if args.only:
            wanted = args.only.split(",")
            unknown = set(wanted) - {method.name for method in methods}
            if unknown:
                sys.exit(f"error: no replayable method named {sorted(unknown)} in {args.methods}")
            methods = [method for method in methods if method.name in wanted]
        if not methods:
            sys.exit(f"error: {args.methods} has no method of ours to replay")
        runs = read_recorded_outputs(parser, args)
        longest = max(len(run.prompt) + len(run.output) for run in runs) + 64
        draft = load_draft(args.draft_model, args.draft_quantize, longest)
        tokenizer = load_tokenizer(args.draft_model)
    except (OSError, KeyError, ValueError, SpecDecodeError) as exc:
        sys.exit(f"error: {exc}")

    # tokens per forward of each (method, category), one value per output, as the bench averages
    per_forward: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in tqdm(runs, desc="replaying", unit="output"):
        target = ReplayTarget(draft.vocab_size, run.prompt, run.output, longest)
        engine = Engine(target, tokenizer, draft_model=draft)
        sampling = SamplingParams(max_new_tokens=len(run.output))
        for method in methods:
            ids, _, stats = engine.generate(run.prompt, sampling, method.spec)
            if ids != run.output:
                sys.exit(f"error: {method.name} did not replay {run.prompt_id}: an engine bug")
            for key in (run.category, "overall"):
                per_forward[method.name][key].append(stats.mean_accepted_tokens)

    categories = sorted({run.category for run in runs})
    print(f"tokens per target forward, mean over {len(runs)} recorded outputs of {args.results}")
    print("| method | " + " | ".join(categories) + " | overall |")
    print("|---" * (len(categories) + 2) + "|")
    for method in methods:
        values = per_forward[method.name]
        cells = [f"{sum(values[c]) / len(values[c]):.2f}" for c in [*categories, "overall"]]
        print(f"| `{method.name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
