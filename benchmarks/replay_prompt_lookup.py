"""Replay prompt lookup over recorded greedy outputs, without running a model.

Greedy decoding is deterministic, so the token ids that plain decoding wrote into a benchmark run's
`results.jsonl` (method `none`) are what every exact method emits too. Replaying a model-free
drafter and a controller over them gives each step's draft and accepted length; a cost curve (ms
for a forward of k tokens) turns the steps into decode time. Beside the drafter's configurations it
prints the bound for any lookup drafter: an oracle that copies from whichever earlier occurrence of
the last token will be accepted furthest, and drafts exactly that far.

Drafting time and prefill are left out. Speed-ups are relative to plain decoding at `--plain-ms`
per token (default: the curve's 1-token cost).

    python benchmarks/replay_prompt_lookup.py \\
        benchmarks/results/core-1.5b-bf16-greedy/results.jsonl \\
        --suite core --costs 1:150,4:195,8:290,16:440
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence

from specdecode.bench.suites import load_suite
from specdecode.control.heuristic import HeuristicController
from specdecode.drafters.prompt_lookup import PromptLookupDrafter
from specdecode.models import load_tokenizer
from specdecode.verify.base import Verdict

#: (context so far) -> draft tokens; `future` is only for the oracle.
Policy = Callable[[list[int], Sequence[int]], list[int]]


def cost_ms(curve: dict[int, float], tokens: int) -> float:
    """Linear interpolation of the curve, extrapolated proportionally past its end."""
    sizes = sorted(curve)
    if tokens <= sizes[0]:
        return curve[sizes[0]]
    for lower, upper in zip(sizes, sizes[1:], strict=False):
        if tokens <= upper:
            fraction = (tokens - lower) / (upper - lower)
            return curve[lower] + fraction * (curve[upper] - curve[lower])
    return curve[sizes[-1]] * tokens / sizes[-1]


def drafter_policy(drafter: PromptLookupDrafter, initial: int, maximum: int) -> Policy:
    controller = HeuristicController(initial, maximum)

    def propose(context: list[int], future: Sequence[int]) -> list[int]:
        draft = drafter.propose(context, controller.budget()).tokens.tolist()
        accepted = accepted_length(draft, future)
        bonus = accepted == len(draft)
        verdict = Verdict(list(range(accepted)), [0] * (accepted + 1), len(draft), bonus)
        controller.observe(verdict)
        return draft

    return propose


def oracle(context: list[int], future: Sequence[int], maximum: int = 64) -> list[int]:
    best: list[int] = []
    for start, token in enumerate(context[:-1]):
        if token != context[-1]:
            continue
        copy = context[start + 1 : start + 1 + maximum]
        length = accepted_length(copy, future)
        if length > len(best):
            best = copy[:length]
    return best


def accepted_length(draft: Sequence[int], future: Sequence[int]) -> int:
    length = 0
    while length < min(len(draft), len(future)) and draft[length] == future[length]:
        length += 1
    return length


def replay(prompt: list[int], output: list[int], policy: Policy, curve: dict[int, float]) -> float:
    """Milliseconds to decode `output` after `prompt` with `policy`."""
    context, done, total = list(prompt), 0, 0.0
    while done < len(output):
        future = output[done:]
        # As the engine does, never draft past the last token to emit (it comes as the bonus).
        draft = policy(context, future)[: len(future) - 1]
        emitted = min(accepted_length(draft, future) + 1, len(future))
        total += cost_ms(curve, len(draft) + 1)
        context += future[:emitted]
        done += emitted
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a benchmark run's results.jsonl (greedy)")
    parser.add_argument("--suite", required=True, help="the suite the run used")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct", help="for the tokenizer")
    parser.add_argument("--method", default="none", help="whose token ids to replay")
    parser.add_argument(
        "--costs", required=True, help="forward cost curve as k:ms pairs, e.g. 1:150,4:195,8:290"
    )
    parser.add_argument("--plain-ms", type=float, help="plain decoding's ms per token")
    parser.add_argument("--max-draft", type=int, default=16, help="the controller's maximum")
    args = parser.parse_args()

    curve = {int(k): float(ms) for k, ms in (pair.split(":") for pair in args.costs.split(","))}
    plain_ms = args.plain_ms or cost_ms(curve, 1)
    tokenizer = load_tokenizer(args.model)
    prompts = {prompt.id: prompt for prompt in load_suite(args.suite)}
    runs = []
    with open(args.results) as lines:
        for line in lines:
            record = json.loads(line)
            if record["method"] == args.method and record.get("token_ids"):
                chat = tokenizer.apply_chat_template(prompts[record["prompt_id"]].chat())
                prompt = tokenizer.encode(chat, add_special_tokens=False)
                runs.append((record["category"], prompt, record["token_ids"]))

    policies: dict[str, Callable[[], Policy]] = {
        "3-gram lookup, full drafts": lambda: drafter_policy(
            PromptLookupDrafter(max_ngram=3, weak_draft=args.max_draft), 6, args.max_draft
        ),
        "prompt-lookup (defaults)": lambda: drafter_policy(
            PromptLookupDrafter(), 6, args.max_draft
        ),
        "oracle lookup (bound)": lambda: oracle,
    }
    categories = sorted({category for category, _, _ in runs})
    print("| policy | " + " | ".join(categories) + " | overall |")
    print("|---" * (len(categories) + 2) + "|")
    for name, make in policies.items():
        ratios = defaultdict(list)
        for category, prompt, output in runs:
            milliseconds = replay(prompt, output, make(), curve)
            ratios[category].append(len(output) * plain_ms / milliseconds)
        every = [ratio for values in ratios.values() for ratio in values]
        cells = [f"{geometric_mean(ratios[c]):.2f}x" for c in categories]
        print(f"| {name} | " + " | ".join(cells) + f" | {geometric_mean(every):.2f}x |")


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


if __name__ == "__main__":
    main()
