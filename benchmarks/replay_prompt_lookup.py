"""Replay prompt lookup over recorded greedy outputs, without running a model.

Greedy decoding is deterministic, so the token ids that plain decoding wrote into a benchmark run's
`results.jsonl` (method `none`) are what every exact method emits too. Replaying a model-free
drafter and a controller over them gives each step's draft and accepted length; a cost curve (ms
for a forward of k tokens) turns the steps into decode time. Beside the drafter's configurations
(under the heuristic controller, and under the cost-aware one that plans from the same curve and
cuts drafts by their forecasts) and llama.cpp's `ngram-simple` policy, it prints the bound for
any drafter that copies earlier text: an oracle that may copy from any earlier occurrence of the
last token, knows how far each copy will be accepted, and picks the cheapest sequence of steps.
Two rows between them split the gap: prompt lookup's own copy drafted exactly as far as it will be
accepted (a perfect draft length), and the best of the copies its longest match offers (a perfect
choice of which earlier occurrence to copy), both up to `--max-draft` tokens.

Drafting time and prefill are left out. Speed-ups are relative to plain decoding at `--plain-ms`
per token (default: the curve's 1-token cost). `--with-prefill` counts each prompt's prefill as
the benchmark's tables do: the recorded run's prefill and plain decoding seconds, with the decoding
scaled by the policy's replayed time relative to plain decoding's.

    python benchmarks/replay_prompt_lookup.py \\
        benchmarks/results/core-1.5b-bf16-greedy/results.jsonl \\
        --suite core --costs 1:150,4:195,8:290,16:440
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from specdecode.bench.suites import load_suite
from specdecode.control.base import StepTimings
from specdecode.control.cost_aware import CostAwareController
from specdecode.control.heuristic import HeuristicController
from specdecode.drafters.prompt_lookup import PromptLookupDrafter, copy_after
from specdecode.errors import SpecDecodeError
from specdecode.models import load_tokenizer
from specdecode.tree import Budget
from specdecode.verify.base import Verdict

#: (context so far, tokens still to come) -> draft; `future` only tells the controller its verdict.
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


def controlled(draft: Callable[[list[int], int], list[int]], maximum: int) -> Policy:
    """A policy from a drafter (context, length wanted) -> tokens, sized by the heuristic
    controller, which hears each step's verdict."""
    controller = HeuristicController(6, maximum)

    def propose(context: list[int], future: Sequence[int]) -> list[int]:
        tokens = draft(context, controller.budget().max_depth)
        accepted = accepted_length(tokens, future)
        bonus = accepted == len(tokens)
        controller.observe(Verdict(list(range(accepted)), [0] * (accepted + 1), len(tokens), bonus))
        return tokens

    return propose


def drafter_policy(drafter: PromptLookupDrafter, maximum: int) -> Policy:
    return controlled(
        lambda context, want: drafter.propose(context, Budget.chain(want)).tokens.tolist(), maximum
    )


def cost_aware_policy(
    drafter: PromptLookupDrafter, maximum: int, curve: dict[int, float]
) -> Policy:
    """The drafter sized by the cost-aware controller, which knows the curve (as the engine's
    measured one) and hears each step's verdict and its cost from the curve; drafting is free."""
    controller = CostAwareController(6, maximum)
    controller.use_costs({k - 1: ms / 1000 for k, ms in curve.items()})
    drafter.reset()

    def propose(context: list[int], future: Sequence[int]) -> list[int]:
        tree = controller.shorten(drafter.propose(context, controller.budget()))
        tokens = tree.tokens.tolist()
        accepted = accepted_length(tokens, future)
        verdict = Verdict(list(range(accepted)), [0] * (accepted + 1), len(tokens), False)
        drafter.update(verdict)
        seconds = cost_ms(curve, len(tokens) + 1) / 1000
        controller.observe(verdict, StepTimings(0.0, seconds))
        return tokens

    return propose


def known_length_policy(drafter: PromptLookupDrafter, maximum: int) -> Policy:
    """The drafter's own copy (the latest occurrence of its longest match), drafted exactly as far
    as it will be accepted: what a perfect choice of draft length would give this drafter."""

    def propose(context: list[int], future: Sequence[int]) -> list[int]:
        tokens = drafter.propose(context, Budget.chain(maximum)).tokens.tolist()
        return tokens[: accepted_length(tokens, future)]

    return propose


def best_occurrence_policy(drafter: PromptLookupDrafter, maximum: int) -> Policy:
    """Like `known_length_policy`, but copying from whichever occurrence of the longest match will
    be accepted furthest: what a perfect choice among the drafter's candidate copies would add."""

    def propose(context: list[int], future: Sequence[int]) -> list[int]:
        tokens = torch.as_tensor(context, dtype=torch.long)  # [L]
        _, ends = drafter.longest_match(tokens)
        best: list[int] = []
        for end in ends.tolist():
            copy = copy_after(tokens, end, maximum).tolist()
            copy = copy[: accepted_length(copy, future)]
            if len(copy) > len(best):
                best = copy
        return best

    return propose


def ngram_simple(context: list[int], want: int, key: int = 12) -> list[int]:
    """llama.cpp's `ngram-simple` (`common_ngram_simple_draft` in common/ngram-map.cpp) with its
    defaults: the most recent earlier occurrence of the last `key` tokens, and what followed it,
    up to `want` tokens and only if at least `key`. llama.cpp's history holds the tokens before the
    last sampled one, which completes the pattern but is never copied."""
    history, sampled = context[:-1], context[-1]
    length = len(history)
    if length <= key + want + 1:
        return []
    pattern = history[length - key + 1 :] + [sampled]
    for start in range(length - key - 1, 0, -1):
        if history[start : start + key] == pattern:
            copied = history[start + key : start + key + want]
            return copied if len(copied) >= key else []
    return []


def stop12_lookup(context: list[int], want: int) -> list[int]:
    """The prompt lookup this project shipped before match-sized drafts, for comparison: 3-, 2-
    then 1-token suffixes, the whole budget, from the latest occurrence that can fill it."""
    length = len(context)
    for n in range(min(3, length - 1), 0, -1):
        suffix = context[length - n :]
        ends = [start + n for start in range(length - n) if context[start : start + n] == suffix]
        if ends:
            full = [end for end in ends if end + want <= length]
            end = full[-1] if full else ends[-1]
            return context[end : end + want]
    return []


def oracle_ms(
    prompt: list[int], output: list[int], curve: dict[int, float], maximum: int = 64
) -> float:
    """The least time any drafter that copies earlier text can take to decode `output`.

    After t emitted tokens, a copy may start after any earlier occurrence of the last token and run
    on into the text it is itself producing (as a periodic copy does); `reach[t]` is the longest
    such copy that would be accepted. Any draft of up to that length is available, and the cheapest
    sequence of steps is found by dynamic programming over t (greedily taking the longest copy is
    not optimal when the cost curve is not linear)."""
    text = prompt + output
    total = len(output)
    reach = []
    for done in range(total):
        position = len(prompt) + done  # index in `text` of the next token to emit
        longest = 0
        for start in range(position - 1):
            if text[start] != text[position - 1]:
                continue
            length = 0
            limit = min(maximum, total - done - 1)  # the last token comes as the bonus
            while length < limit and text[start + 1 + length] == text[position + length]:
                length += 1
            longest = max(longest, length)
        reach.append(longest)
    best = [0.0] * (total + 1)  # best[t]: least ms to emit output[t:]
    for done in range(total - 1, -1, -1):
        best[done] = min(
            cost_ms(curve, drafted + 1) + best[done + drafted + 1]
            for drafted in range(reach[done] + 1)
        )
    return best[0]


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
    parser.add_argument(
        "--with-prefill",
        action="store_true",
        help="count each prompt's recorded prefill, as the benchmark's speed-ups do",
    )
    args = parser.parse_args()

    try:
        curve = {int(k): float(ms) for k, ms in (pair.split(":") for pair in args.costs.split(","))}
    except ValueError:
        parser.error(f"--costs takes k:ms pairs separated by commas, got {args.costs!r}")
    if args.with_prefill and args.method != "none":
        parser.error("--with-prefill scales plain decoding's recorded seconds: use --method none")
    plain_ms = args.plain_ms or cost_ms(curve, 1)
    try:
        runs = recorded_runs(args.results, args.suite, args.model, args.method)
    except (OSError, KeyError, ValueError, SpecDecodeError) as exc:
        sys.exit(f"error: cannot replay {args.results}: {exc}")
    if not runs:
        sys.exit(f"error: {args.results} holds no token ids of method {args.method!r}")

    rows: dict[str, Callable[[list[int], list[int]], float]] = {
        "prompt lookup before match-sized drafts": lambda prompt, output: replay(
            prompt, output, controlled(stop12_lookup, args.max_draft), curve
        ),
        "prompt-lookup (defaults)": lambda prompt, output: replay(
            prompt, output, drafter_policy(PromptLookupDrafter(), args.max_draft), curve
        ),
        "prompt-lookup, cost-aware": lambda prompt, output: replay(
            prompt, output, cost_aware_policy(PromptLookupDrafter(), args.max_draft, curve), curve
        ),
        "prompt-lookup's copy, known length": lambda prompt, output: replay(
            prompt, output, known_length_policy(PromptLookupDrafter(), args.max_draft), curve
        ),
        "best occurrence of its match, known length": lambda prompt, output: replay(
            prompt, output, best_occurrence_policy(PromptLookupDrafter(), args.max_draft), curve
        ),
        "llama.cpp ngram-simple (12-token match, up to 48)": lambda prompt, output: replay(
            prompt, output, lambda context, future: ngram_simple(context, 48), curve
        ),
        "oracle lookup (bound)": lambda prompt, output: oracle_ms(prompt, output, curve),
    }
    categories = sorted({run.category for run in runs})
    print("| policy | " + " | ".join(categories) + " | overall |")
    print("|---" * (len(categories) + 2) + "|")
    for name, milliseconds_for in rows.items():
        ratios = defaultdict(list)
        for run in runs:
            decode = milliseconds_for(run.prompt, run.output) / (len(run.output) * plain_ms)
            ratios[run.category].append(run.speed_up(decode, args.with_prefill))
        every = [ratio for values in ratios.values() for ratio in values]
        cells = [f"{geometric_mean(ratios[c]):.2f}x" for c in categories]
        print(f"| {name} | " + " | ".join(cells) + f" | {geometric_mean(every):.2f}x |")


@dataclass
class RecordedRun:
    category: str
    prompt: list[int]
    output: list[int]
    prefill_seconds: float
    decode_seconds: float  # the recorded run's, after its prefill

    def speed_up(self, decode_fraction: float, with_prefill: bool) -> float:
        """The speed-up of a policy that decodes in `decode_fraction` of plain decoding's time."""
        if not with_prefill:
            return 1.0 / decode_fraction
        plain = self.prefill_seconds + self.decode_seconds
        return plain / (self.prefill_seconds + decode_fraction * self.decode_seconds)


def recorded_runs(results: str, suite: str, model: str, method: str) -> list[RecordedRun]:
    """Every record of `method` with token ids."""
    tokenizer = load_tokenizer(model)
    prompts = {prompt.id: prompt for prompt in load_suite(suite)}
    runs = []
    with open(results) as lines:
        for line in lines:
            record = json.loads(line)
            if record["method"] == method and record.get("token_ids"):
                chat = tokenizer.apply_chat_template(prompts[record["prompt_id"]].chat())
                prompt = tokenizer.encode(chat, add_special_tokens=False)
                prefill = record.get("prefill_seconds") or 0.0
                runs.append(
                    RecordedRun(
                        record["category"],
                        prompt,
                        record["token_ids"],
                        prefill,
                        record["seconds"] - prefill,
                    )
                )
    return runs


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


if __name__ == "__main__":
    main()
