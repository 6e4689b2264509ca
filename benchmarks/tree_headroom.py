"""How many tokens per forward could any tree of the draft model's candidates accept, at best?

Issue 4 asks a greedy dynamic tree for 30% more tokens per target forward than the best chain with
the same number of nodes. This script bounds what any such tree can reach with a given draft
model, from recorded greedy outputs and without the target model.

Greedy decoding is deterministic, so the token ids that plain decoding wrote into a benchmark run's
`results.jsonl` (method `none`) are what every exact method emits. One forward of the draft model
over each prompt and output (teacher forcing, as the draft sees the accepted text) gives the rank
of every emitted token among the draft's next-token candidates, 1 for its argmax. A step that
starts at output position `t` emits the drafted tokens it accepts plus the target's own token:

- a chain of `N` nodes accepts the run of rank-1 tokens from `t`, at most `N` of them;
- a tree whose children are the draft's best-ranked candidates (the static top-k tree, EAGLE-2's
  dynamic tree, delayed expansion: every tree the draft-model drafter builds) holds a path only
  with each path node's better-ranked siblings, since those have the higher cumulative draft
  probability too; a path whose tokens have ranks `r_t, ..., r_{t+m-1}` costs at least their
  sum in nodes. Knowing the output, the best such tree of `N` nodes accepts the longest path
  whose ranks sum to at most `N`. `--width W` adds the drafter's limit of `W` children per node.

No drafter knows the output, so the bound is loose, but no tree of draft candidates can beat it.

    python benchmarks/tree_headroom.py \\
        benchmarks/results/reference-spec-bench-1.5b-greedy-ddec75f/results.jsonl \\
        --suite spec-bench --draft-model qwen2.5-coder-0.5b-instruct --nodes 8,16
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from specdecode.backends.torch import TorchBackend
from specdecode.bench.suites import load_suite
from specdecode.errors import SpecDecodeError
from specdecode.models import load_checkpoint, load_tokenizer

#: tokens per draft forward when teacher forcing (small: a forward's logits are [T, vocab])
_CHUNK = 64


def chain_accepts(ranks: Sequence[int], start: int, nodes: int) -> int:
    """Drafted tokens a chain of `nodes` accepts from output position `start`."""
    limit = min(nodes, len(ranks) - start - 1)  # the last token comes as the bonus
    accepted = 0
    while accepted < limit and ranks[start + accepted] == 1:
        accepted += 1
    return accepted


def best_tree_accepts(
    ranks: Sequence[int], start: int, nodes: int, width: int | None = None
) -> int:
    """Drafted tokens the best tree of `nodes` draft candidates accepts from `start`, knowing
    the output: the longest path whose ranks sum to at most `nodes` (each rank at most `width`)."""
    limit = len(ranks) - start - 1
    accepted, spent = 0, 0
    while accepted < limit:
        rank = ranks[start + accepted]
        if (width is not None and rank > width) or spent + rank > nodes:
            break
        spent += rank
        accepted += 1
    return accepted


def tokens_per_forward(ranks: Sequence[int], accepts) -> tuple[int, int]:
    """(tokens emitted, target forwards) decoding the whole output, step after step."""
    position, forwards = 0, 0
    while position < len(ranks):
        position += accepts(ranks, position) + 1
        forwards += 1
    return len(ranks), forwards


@dataclass
class DraftView:
    """What the draft model says at each output position, teacher-forced."""

    ranks: list[int]  # of the emitted token among the draft's candidates, 1 for its argmax
    top_probs: list[list[float]]  # the draft's probabilities of its best `_TOP` candidates


#: candidates per position whose draft probabilities --calibration reads
_TOP = 3


def draft_view(model, prompt: Sequence[int], output: Sequence[int]) -> DraftView:
    """The draft model at each output token, given the prompt and the output before it."""
    model.reset()
    model.extend(prompt[:-1])
    fed = [prompt[-1], *output[:-1]]  # each one's logits predict the next output token
    view = DraftView([], [])
    with torch.inference_mode():
        for begin in range(0, len(fed), _CHUNK):
            logits = model.forward(torch.tensor(fed[begin : begin + _CHUNK])).float()  # [T, V]
            wanted = torch.tensor(output[begin : begin + _CHUNK])
            chosen = logits.gather(1, wanted[:, None])  # [T, 1]
            view.ranks.extend((1 + (logits > chosen).sum(dim=1)).tolist())
            # the dynamic tree ranks candidates by this softmax at temperature 0
            top = torch.softmax(logits, dim=-1).topk(_TOP, dim=-1).values  # [T, _TOP]
            view.top_probs.extend(top.tolist())
    return view


def calibration_table(views: Sequence[DraftView], edges: Sequence[float]) -> list[str]:
    """Markdown rows: for the draft's rank-r candidate with probability in each bin, how often it
    was the token the target emitted. A tree that ranks nodes by draft probability (EAGLE-2)
    assumes this equals the probability; where it does not, the ranking misplaces nodes."""
    bins = list(zip(edges[:-1], edges[1:], strict=False))
    counts = [[[0, 0.0, 0] for _ in bins] for _ in range(_TOP)]  # [rank][bin] -> n, sum q, hits
    for view in views:
        for rank_emitted, probs in zip(view.ranks, view.top_probs, strict=True):
            for r, q in enumerate(probs):
                b = next(i for i, (lo, hi) in enumerate(bins) if q < hi or hi == edges[-1])
                cell = counts[r][b]
                cell[0] += 1
                cell[1] += q
                cell[2] += rank_emitted == r + 1
    rows = ["| draft probability | " + " | ".join(f"rank {r + 1}" for r in range(_TOP)) + " |"]
    rows.append("|---" * (_TOP + 1) + "|")
    for b, (lo, hi) in enumerate(bins):
        cells = []
        for r in range(_TOP):
            n, total_q, hits = counts[r][b]
            cells.append(f"{hits / n:.3f} vs {total_q / n:.3f} (n={n})" if n else "-")
        rows.append(f"| {lo:g} to {hi:g} | " + " | ".join(cells) + " |")
    return rows


@dataclass
class Recorded:
    prompt_id: str
    category: str
    prompt: list[int]
    output: list[int]


def recorded_outputs(
    results: str, suite: str, tokenizer_model: str, per_category: int | None = None
) -> list[Recorded]:
    """Plain decoding's outputs (method `none`, first repeat) with their prompts' token ids, the
    first `per_category` of each category if given; a prompt recorded twice (cut off and run again
    on --resume) counts once."""
    tokenizer = load_tokenizer(tokenizer_model)
    prompts = {prompt.id: prompt for prompt in load_suite(suite)}
    runs: dict[str, Recorded] = {}
    with open(results) as lines:
        for line in lines:
            record = json.loads(line)
            if record["method"] != "none" or record["repeat"] != 0 or not record.get("token_ids"):
                continue
            chat = tokenizer.apply_chat_template(prompts[record["prompt_id"]].chat())
            prompt = tokenizer.encode(chat, add_special_tokens=False)
            prompt_id = record["prompt_id"]
            runs[prompt_id] = Recorded(prompt_id, record["category"], prompt, record["token_ids"])
    if per_category is None:
        return list(runs.values())
    kept, taken = [], defaultdict(int)
    for run in runs.values():
        taken[run.category] += 1
        if taken[run.category] <= per_category:
            kept.append(run)
    return kept


def add_recorded_output_options(parser: argparse.ArgumentParser) -> None:
    """The options of the scripts that read recorded greedy outputs and run the draft model."""
    parser.add_argument("results", help="a greedy benchmark run's results.jsonl")
    parser.add_argument("--suite", required=True, help="the suite the run used")
    parser.add_argument("--draft-model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument(
        "--draft-quantize",
        choices=["int8", "none"],
        default="int8",
        help="the draft's weights, as the benchmark loads them (default int8)",
    )
    parser.add_argument(
        "--per-category", type=int, help="only the first N recorded outputs of each category"
    )


def read_recorded_outputs(parser: argparse.ArgumentParser, args) -> list[Recorded]:
    """The recorded outputs the options name; a bad option or file exits with one line."""
    if args.per_category is not None and args.per_category < 1:
        parser.error("--per-category must be at least 1")
    try:
        runs = recorded_outputs(args.results, args.suite, args.draft_model, args.per_category)
    except (OSError, KeyError, ValueError, SpecDecodeError) as exc:
        sys.exit(f"error: {exc}")
    if not runs:
        sys.exit(f"error: {args.results} holds no token ids of plain decoding (method none)")
    return runs


def load_draft(name: str, quantize: str, max_context: int) -> TorchBackend:
    checkpoint = load_checkpoint(name, dtype=torch.bfloat16)
    return TorchBackend.from_checkpoint(
        checkpoint,
        dtype=torch.bfloat16,
        max_context=max_context,
        quantize=None if quantize == "none" else quantize,
    )


def views_of_draft(runs: list[Recorded], draft_model: str, quantize: str) -> dict[str, DraftView]:
    longest = max(len(run.prompt) + len(run.output) for run in runs)
    model = load_draft(draft_model, quantize, longest + 1)
    progress = tqdm(runs, desc="draft forwards", unit="output")
    return {run.prompt_id: draft_view(model, run.prompt, run.output) for run in progress}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recorded_output_options(parser)
    parser.add_argument("--nodes", default="8,16", help="node budgets, comma-separated")
    parser.add_argument("--width", type=int, default=2, help="children per node of the drafter")
    parser.add_argument("--ranks-out", help="write each output's draft ranks to this JSON file")
    parser.add_argument(
        "--ranks-in", help="read the ranks from a --ranks-out file instead of running the draft"
    )
    parser.add_argument(
        "--calibration",
        action="store_true",
        help="also print how often the draft's best candidates were the emitted token, by their"
        " draft probability (needs the draft: not with --ranks-in)",
    )
    args = parser.parse_args()
    if args.calibration and args.ranks_in:
        parser.error("--calibration needs the draft's probabilities: drop --ranks-in")
    try:
        budgets = [int(n) for n in args.nodes.split(",")]
    except ValueError:
        parser.error(f"--nodes takes integers separated by commas, got {args.nodes!r}")
    if any(n < 1 for n in budgets) or args.width < 1:
        parser.error("--nodes and --width must be at least 1")

    runs = read_recorded_outputs(parser, args)
    try:
        if args.ranks_in:
            with open(args.ranks_in) as saved:
                ranks = json.load(saved)
        else:
            views = views_of_draft(runs, args.draft_model, args.draft_quantize)
            ranks = {prompt_id: view.ranks for prompt_id, view in views.items()}
    except (OSError, KeyError, ValueError, SpecDecodeError) as exc:
        sys.exit(f"error: {exc}")
    missing = [run.prompt_id for run in runs if run.prompt_id not in ranks]
    if missing:
        sys.exit(f"error: {args.ranks_in} has no ranks of {missing[0]}: redo it with --ranks-out")
    if args.ranks_out:
        with open(args.ranks_out, "w") as out:
            json.dump(ranks, out)

    policies = {}
    for n in budgets:
        policies[f"chain-{n}"] = lambda r, s, n=n: chain_accepts(r, s, n)
        policies[f"best tree, {n} nodes, {args.width} wide"] = lambda r, s, n=n: best_tree_accepts(
            r, s, n, args.width
        )
        policies[f"best tree, {n} nodes, any width"] = lambda r, s, n=n: best_tree_accepts(r, s, n)
    categories = sorted({run.category for run in runs})
    print(f"tokens per target forward, mean over {len(runs)} recorded outputs of {args.results}")
    print("| policy | " + " | ".join(categories) + " | overall |")
    print("|---" * (len(categories) + 2) + "|")
    for name, accepts in policies.items():
        # one value per output, averaged as the benchmark's tokens/forward column is
        per_forward: dict[str, list[float]] = defaultdict(list)
        for run in runs:
            tokens, forwards = tokens_per_forward(ranks[run.prompt_id], accepts)
            for key in (run.category, "overall"):
                per_forward[key].append(tokens / forwards)
        values = [per_forward[c] for c in [*categories, "overall"]]
        print(f"| {name} | " + " | ".join(f"{sum(v) / len(v):.2f}" for v in values) + " |")
    replayed = [ranks[run.prompt_id] for run in runs]
    share = [sum(r == k for rs in replayed for r in rs) for k in (1, 2, 3)]
    total = sum(len(rs) for rs in replayed)
    print(
        f"draft rank of the emitted token: 1 in {share[0] / total:.1%},"
        f" 2 in {share[1] / total:.1%}, 3 in {share[2] / total:.1%},"
        f" worse in {1 - sum(share) / total:.1%}"
    )
    if args.calibration:
        print(
            "\nhow often the draft's rank-r candidate was the emitted token vs its mean draft"
            " probability, by draft probability"
        )
        edges = [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1]
        print("\n".join(calibration_table([views[run.prompt_id] for run in runs], edges)))


if __name__ == "__main__":
    main()
