"""`specdecode tune-skip`: search once, on calibration text, which sublayers a layer-skip draft
leaves out, and save the set for `--drafter layer-skip --skip-file FILE` (Draft & Verify's
offline search, Zhang et al., ACL 2024).

The calibration text is the model's own greedy answers to instructions made from the standard
library (the recipe `train-drafter` distills from, none sharing a window with a bench prompt), so
the set is never tuned on the prompts it is measured on. Each answer keeps its own cache (a fork
of the target), and a candidate set's score is its drafts' mean agreement with the full model over
all the answers' tokens (`layer_search.PlanScorer`); the search is `layer_search.SkipSearch`.
Draft & Verify maximises measured tokens per second instead; agreement does not depend on how
busy the machine is, and the bench measures the speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from specdecode.backends.base import LayerPlan
from specdecode.drafters.layer_search import (
    ATTENTION,
    MLP,
    PlanScorer,
    SkipSearch,
    plan_of,
    save_plan,
    skip_count,
)
from specdecode.errors import SpecDecodeError

if TYPE_CHECKING:
    from specdecode.api import SpecDecoder


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tune-skip",
        help="search which layers a layer-skip draft leaves out, and save them",
        description="Search once which attention and MLP sublayers a self-speculative draft "
        "skips, on the model's own answers to calibration instructions (never the bench's "
        "prompts), and save the set for `specdecode generate --drafter layer-skip --skip-file "
        "FILE`. Without a file, layer-skip searches while decoding (SWIFT); a saved set drafts "
        "well from the first request.",
    )
    p.add_argument("--model", required=True, help="registry name, GGUF file or model directory")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the set (JSON)")
    p.add_argument(
        "--skip-ratio",
        type=float,
        default=0.45,
        metavar="R",
        help="the fraction of the middle layers' sublayers to skip (default: 0.45)",
    )
    p.add_argument("--tries", type=int, default=200, help="candidate sets to score (default: 200)")
    p.add_argument("--prompts", type=int, default=4, help="calibration instructions (default: 4)")
    p.add_argument(
        "--tokens",
        type=int,
        default=64,
        help="tokens of the model's answer to each, scored (default: 64)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the instructions and the search")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.set_defaults(func=run)


def calibration_scorers(llm: SpecDecoder, prompts: int, tokens: int, seed: int) -> list[PlanScorer]:
    """A scorer per calibration answer: the model's greedy answer of `tokens` tokens to each of
    `prompts` instructions, cached in a fork of the target of its own."""
    from tqdm import tqdm

    from specdecode import SamplingParams, SpecConfig
    from specdecode.train.data import distill_conversations

    target = llm.engine.target
    if not target.supports_layer_plans or target.num_layers is None:
        raise SpecDecodeError("tune-skip runs part of the model, which only the torch backend can")
    sampling = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    scorers = []
    conversations = distill_conversations(prompts, seed)
    for conversation in tqdm(conversations, desc="calibration answers", unit="answer"):
        prompt = llm.encode_prompt(conversation[0]["content"])
        answer = llm.generate(prompt, sampling, SpecConfig(drafter="none")).token_ids
        context = prompt + answer
        fork = target.fork()
        fork.prefill(context)
        scorers.append(PlanScorer(fork, context, len(prompt), len(answer) - 1))
    return scorers


def mean_score(scorers: list[PlanScorer], plan: LayerPlan) -> float:
    return sum(scorer.score(plan) for scorer in scorers) / len(scorers)


def search_skips(
    scorers: list[PlanScorer],
    num_layers: int,
    count: int,
    tries: int,
    seed: int,
    kinds: tuple[int, ...] = (ATTENTION, MLP),
) -> SkipSearch:
    """`tries` candidate sets of `count` sublayers (of `kinds`) scored on the calibration
    answers."""
    from tqdm import tqdm

    search = SkipSearch(num_layers, count, seed, kinds)
    progress = tqdm(range(tries), desc=f"skip sets of {count}", unit="set")
    for _ in progress:
        candidate = search.candidate()
        search.report(candidate, mean_score(scorers, plan_of(candidate)))
        progress.set_postfix(best=f"{search.best_score:.3f}")
    return search


def run(args: argparse.Namespace) -> int:
    from specdecode import SpecDecoder

    if args.tries < 1 or args.prompts < 1 or args.tokens < 2:
        raise SpecDecodeError("tune-skip needs --tries >= 1, --prompts >= 1 and --tokens >= 2")
    if not 0.0 < args.skip_ratio < 1.0:
        raise SpecDecodeError(f"--skip-ratio must be between 0 and 1, got {args.skip_ratio}")
    started = time.perf_counter()
    llm = SpecDecoder.load(args.model, dtype=args.dtype)
    scorers = calibration_scorers(llm, args.prompts, args.tokens, args.seed)
    layers = llm.engine.target.num_layers
    assert layers is not None
    search = search_skips(
        scorers, layers, skip_count(layers, args.skip_ratio), args.tries, args.seed
    )
    plan = search.best_plan
    assert search.best_score is not None
    meta = {
        "model": args.model,
        "num_layers": layers,
        "skip_ratio": args.skip_ratio,
        "agreement": round(search.best_score, 4),
        "runs": round(plan.runs(layers), 4),
        "tries": search.tries,
        "calibration": f"{args.prompts} answers of {args.tokens} tokens, seed {args.seed}",
    }
    try:
        save_plan(args.out, plan, meta)
    except OSError as exc:
        raise SpecDecodeError(f"cannot write {args.out}: {exc.strerror}") from None
    print(
        f"skips {len(plan.skip_attention)} attention and {len(plan.skip_mlp)} MLP sublayers of "
        f"{layers} layers (runs {meta['runs']:.0%} of them); its drafts agree with the model on "
        f"{search.best_score:.1%} of the calibration tokens; wrote {args.out} in "
        f"{time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    return 0
