"""Replay model-free drafters over a run's recorded greedy outputs, session by session.

Greedy decoding is deterministic, so the token ids plain decoding wrote into a benchmark run's
`results.jsonl` (method `none`) are what every exact method emits. This script feeds them, in each
session's order, through a drafter that learns across requests (the `suffix` drafter's
cross-request index hears each finished request, as in the bench), and counts each step's accepted
length: a chain is accepted up to its first wrong token, a tree along its deepest path that the
recorded output follows. It prints tokens per forward (emitted tokens over verification steps) by
the request's index in its session (a prompt outside any session is a session of one), for
several configurations side by side, in seconds rather than the hours a model run takes: prompt
lookup, suffix decoding with several length rules, sam's automaton copies, Arctic Inference's
suffix cache where it is importable (benchmarks/build_arctic_suffix.sh), and a bound for every
drafter that copies text it has seen.

A configuration's draft length comes either from the heuristic controller (as the bench's
methods: start at 6, +2 after a fully accepted draft, -1 after a rejection, at most
`--max-draft`) or, with `fixed`, is the drafter's own choice up to `--max-draft` (as Arctic
Inference and vLLM run suffix decoding). "known length" rows cut each draft where it will be
rejected: a bound on what any length rule could get from that drafter.

    python benchmarks/replay_suffix.py \\
        benchmarks/results/sessions-suffix-1.5b-llamacpp/results.jsonl --suite sessions
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from specdecode.bench.suites import load_suite
from specdecode.config import SamplingParams
from specdecode.control.heuristic import HeuristicController
from specdecode.drafters.base import Drafter
from specdecode.drafters.prompt_lookup import PromptLookupDrafter
from specdecode.drafters.sam import SamDrafter
from specdecode.drafters.suffix import SuffixDrafter
from specdecode.errors import SpecDecodeError
from specdecode.models import load_tokenizer
from specdecode.tree import Budget, DraftTree
from specdecode.verify.base import Verdict


@dataclass
class Request:
    session: str
    index: int  # 1-based, within the session
    category: str
    prompt: list[int]
    output: list[int]


def sessions_of(results: str, suite: str, model: str, method: str) -> list[list[Request]]:
    """The recorded requests of `method` (first repeat), grouped by session in the suite's order."""
    tokenizer = load_tokenizer(model)
    outputs = {}
    with open(results) as lines:
        for line in lines:
            record = json.loads(line)
            if record["method"] == method and record["repeat"] == 0 and record.get("token_ids"):
                outputs[record["prompt_id"]] = record["token_ids"]
    grouped: dict[str, list[Request]] = defaultdict(list)
    for prompt in load_suite(suite):
        if prompt.id not in outputs:
            continue
        chat = tokenizer.apply_chat_template(prompt.chat())
        key = prompt.session or prompt.id  # a prompt outside any session is a session of one
        grouped[key].append(
            Request(
                key,
                len(grouped[key]) + 1,
                prompt.category,
                tokenizer.encode(chat, add_special_tokens=False),
                outputs[prompt.id],
            )
        )
    return list(grouped.values())


def accepted_path(tree: DraftTree, future: Sequence[int]) -> int:
    """How many tokens of `tree` verification accepts if `future` is what the target emits."""
    parents = tree.parents.tolist()
    tokens = tree.tokens.tolist()
    depth_of: list[int] = []
    best = 0
    for node, (token, parent) in enumerate(zip(tokens, parents, strict=True)):
        depth = 1 if parent < 0 else depth_of[parent] + 1
        on_path = (parent < 0 or depth_of[parent] > 0) and depth <= len(future)
        accepted = on_path and token == future[depth - 1]
        depth_of.append(depth if accepted else 0)
        best = max(best, depth_of[node])
    return best


def cut(tree: DraftTree, keep: int) -> DraftTree:
    """The tree's first `keep` nodes (a chain's first `keep` tokens)."""
    if keep >= tree.tokens.numel():
        return tree
    return DraftTree(tree.tokens[:keep], tree.parents[:keep])


@dataclass
class Config:
    name: str
    make: Callable[[dict], Drafter]  # from the session's shared state
    controlled: bool = True  # heuristic controller; False: the drafter's own length
    known_length: bool = False  # cut each chain where it will be rejected (a bound)
    tree: tuple[int, int] | None = None  # (width, nodes) for a tree budget


class CopyBound(Drafter):
    """Not a drafter but a bound on every drafter that copies text it has seen (prompt lookup,
    suffix decoding): it drafts the longest prefix of what comes next that follows any
    occurrence of the last token in the session so far (every earlier request's prompt and
    output, this prompt and output). It reads the future, which the replay hands it."""

    name = "copy-bound"

    def __init__(self) -> None:
        self.history: list[int] = []  # earlier requests of the session, separated by -1
        self.future: Sequence[int] = ()

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        text = np.asarray(self.history + [-1] + list(context[:-1]), dtype=np.int64)
        wanted = np.asarray(self.future[: budget.max_depth], dtype=np.int64)
        alive = np.flatnonzero(text == context[-1]) + 1  # where a copy would start
        length = 0
        while alive.size and length < wanted.size:
            alive = alive[alive < text.size]
            alive = alive[text[alive] == wanted[length]] + 1
            length += 1 if alive.size else 0
        tokens = torch.as_tensor(wanted[:length], dtype=torch.long)
        return DraftTree(tokens, torch.arange(length, dtype=torch.long) - 1)

    def end(self, context: Sequence[int]) -> None:
        self.history += [-1] + [int(t) for t in context]


def replay_session(config: Config, session: list[Request], maximum: int) -> list[tuple[int, int]]:
    """(tokens emitted, forwards) for each request of the session, in order."""
    shared: dict = {}
    drafter = config.make(shared)
    counts = []
    for request in session:
        controller = HeuristicController(6, maximum)
        drafter.begin(request.prompt, SamplingParams(temperature=0.0), None)
        context, done, forwards = list(request.prompt), 0, 0
        while done < len(request.output):
            future = request.output[done:]
            length = controller.budget().max_depth if config.controlled else maximum
            if config.tree is not None:
                width, nodes = config.tree
                budget = Budget(max_depth=length, max_width=width, max_nodes=nodes)
            else:
                budget = Budget.chain(length)
            if isinstance(drafter, CopyBound):
                drafter.future = future
            tree = drafter.propose(context, budget)
            if config.known_length and config.tree is None:
                tree = cut(tree, accepted_path(tree, future))
            # As the engine does, never draft past the last token to emit (it comes as the bonus).
            accepted = min(accepted_path(tree, future), len(future) - 1)
            drafted = tree.tokens.numel()
            bonus = accepted >= drafted
            verdict = Verdict(list(range(accepted)), [0] * (accepted + 1), drafted, bonus)
            controller.observe(verdict)
            drafter.update(verdict)
            context += future[: accepted + 1]
            done += accepted + 1
            forwards += 1
        drafter.end(context)
        counts.append((len(request.output), forwards))
    return counts


class ArcticSuffix(Drafter):
    """Arctic Inference's suffix decoding cache (`arctic_inference.suffix_decoding`, built on the
    CPU by benchmarks/build_arctic_suffix.sh), driven as vLLM's `suffix` proposer drives it: the
    prompt starts a request, each step's accepted tokens are added to it (and to the global tree),
    and the last `max_tree_depth` tokens are the pattern to match."""

    name = "arctic-suffix"

    def __init__(self, shared: dict, tree: bool = False, max_tree_depth: int = 24) -> None:
        from arctic_inference.suffix_decoding import SuffixDecodingCache

        if "arctic" not in shared:
            shared["arctic"] = SuffixDecodingCache(max_tree_depth=max_tree_depth)
        self.cache = shared["arctic"]
        self.tree = tree
        self.max_tree_depth = max_tree_depth
        self.request = 0

    def begin(self, prompt, sampling, rng, target=None) -> None:
        self.request += 1
        self.cache.start_request(self.request, list(prompt))
        self.seen = len(prompt)

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        if len(context) > self.seen:
            self.cache.add_active_response(self.request, list(context[self.seen :]))
            self.seen = len(context)
        draft = self.cache.speculate(
            self.request,
            list(context[-self.max_tree_depth :]),
            max_spec_tokens=min(budget.max_depth, budget.max_nodes or 0),
            use_tree_spec=self.tree,
        )
        return DraftTree(
            torch.tensor(draft.token_ids, dtype=torch.long),
            torch.tensor(draft.parents, dtype=torch.long),
        )

    def end(self, context: Sequence[int]) -> None:
        self.cache.stop_request(self.request)


def arctic_available() -> bool:
    try:
        import arctic_inference.suffix_decoding  # noqa: F401
    except ImportError:
        return False
    return True


def suffix(**options) -> Callable[[dict], Drafter]:
    tree = options.pop("tree", False)
    return lambda shared: SuffixDrafter(**options, shared=shared, tree=tree)


CONFIGS = [
    Config("prompt-lookup (bench default)", lambda shared: PromptLookupDrafter()),
    Config("prompt-lookup, known length", lambda shared: PromptLookupDrafter(), False, True),
    Config("suffix (bench default)", suffix()),
    Config("suffix, own length", suffix(), controlled=False),
    Config("suffix, factor 2, own length", suffix(max_spec_factor=2.0), controlled=False),
    Config("suffix, factor 4, own length", suffix(max_spec_factor=4.0), controlled=False),
    Config(
        "suffix, factor 4, p 0.3, own length",
        suffix(max_spec_factor=4.0, min_token_prob=0.3),
        controlled=False,
    ),
    Config("suffix, factor 2", suffix(max_spec_factor=2.0)),
    Config("suffix, factor 4", suffix(max_spec_factor=4.0)),
    Config("suffix, factor 4, known length", suffix(max_spec_factor=4.0), False, True),
    Config(
        "suffix tree 2x16, factor 4, own length",
        suffix(max_spec_factor=4.0, tree=True),
        controlled=False,
        tree=(2, 16),
    ),
    Config("sam copies, min match 1", lambda shared: SamDrafter(min_match=1)),
    Config("sam copies, min match 2", lambda shared: SamDrafter(min_match=2)),
    Config("copy bound (reads the future)", lambda shared: CopyBound(), controlled=False),
]
ARCTIC = [
    Config("Arctic Inference suffix, own length", lambda shared: ArcticSuffix(shared), False),
    Config(
        "Arctic Inference suffix tree 2x16, own length",
        lambda shared: ArcticSuffix(shared, tree=True),
        controlled=False,
        tree=(2, 16),
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a benchmark run's results.jsonl (greedy)")
    parser.add_argument("--suite", default="sessions", help="the suite the run used")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct", help="for the tokenizer")
    parser.add_argument("--method", default="none", help="whose token ids to replay")
    parser.add_argument("--max-draft", type=int, default=16, help="the longest draft")
    parser.add_argument("--only", help="replay only configurations whose name contains this")
    args = parser.parse_args()
    try:
        sessions = sessions_of(args.results, args.suite, args.model, args.method)
    except (OSError, KeyError, ValueError, SpecDecodeError) as exc:
        sys.exit(f"error: cannot replay {args.results}: {exc}")
    if not sessions:
        sys.exit(f"error: {args.results} holds no token ids of method {args.method!r}")
    longest = max(len(session) for session in sessions)
    categories = sorted({request.category for session in sessions for request in session})
    first = 3 if longest >= 3 else 1  # a suite without sessions: every request
    by_index: dict[str, list[str]] = {}
    by_category: dict[str, list[str]] = {}
    configs = CONFIGS + ARCTIC if arctic_available() else CONFIGS
    if not arctic_available():
        print("(Arctic Inference's suffix cache is not importable: its rows are left out)\n")
    for config in configs:
        if args.only and args.only not in config.name:
            continue
        counts = []  # (request, tokens, forwards)
        for session in sessions:
            replayed = replay_session(config, session, args.max_draft)
            counts += [(request, *count) for request, count in zip(session, replayed, strict=True)]
        ratio = tokens_per_forward
        by_index[config.name] = [
            *(ratio(counts, lambda r, i=i: r.index == i) for i in range(1, longest + 1)),
            ratio(counts, lambda r: r.index >= 3),
            ratio(counts, lambda r: True),
        ]
        by_category[config.name] = [
            ratio(counts, lambda r, c=c: r.category == c and r.index >= first) for c in categories
        ]
    print(f"Tokens per forward by the request's index in its session (at most {args.max_draft})\n")
    table([*(f"request {i}" for i in range(1, longest + 1)), "3rd on", "overall"], by_index)
    print(f"\nTokens per forward from request {first} on, by category\n")
    table(categories, by_category)


def tokens_per_forward(counts: list[tuple[Request, int, int]], chosen) -> str:
    tokens = sum(emitted for request, emitted, _ in counts if chosen(request))
    forwards = sum(steps for request, _, steps in counts if chosen(request))
    return f"{tokens / forwards:.2f}" if forwards else "-"


def table(columns: list[str], rows: dict[str, list[str]]) -> None:
    print("| configuration | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
