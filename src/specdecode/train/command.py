"""`specdecode train-drafter`: data, target features, training and the saved head, in one command.

    specdecode train-drafter --model M --kind eagle [--out DIR] [--data FILES...]

Work is kept in `<out>/training/`: the target's answers to the self-distillation prompts
(`distill.jsonl`, appended one by one), the target features (`features/`, one file per
sequence) and the training checkpoint. An interrupted run started again with the same command
picks up where it stopped: answers and features already on disk are not recomputed, and training
resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from specdecode.errors import SpecDecodeError
from specdecode.heads import HEAD_KINDS, default_head_dir
from specdecode.heads.eagle3 import Eagle3Config, save_head
from specdecode.train.data import (
    Recipe,
    TrainingSequence,
    distill_prompts,
    read_user_files,
    stdlib_texts,
    text_sequences,
)
from specdecode.train.eagle import TrainReport, TrainSettings, train_eagle
from specdecode.train.features import FeatureStore


@dataclass
class TrainResult:
    head_dir: Path
    report: TrainReport
    sequences: int
    tokens: int
    seconds: dict[str, float]


def _distilled(llm, recipe: Recipe, work: Path) -> list[TrainingSequence]:
    """The target's greedy answers to the recipe's prompts, cached line by line (lines of another
    model, or cut by an interruption, are made again)."""
    from specdecode.config import SamplingParams, SpecConfig

    path = work / "distill.jsonl"
    done: dict[str, list[int]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                if row.get("model", llm.name) == llm.name:
                    done[row["prompt"]] = row["answer"]
            except (json.JSONDecodeError, KeyError, AttributeError):
                continue
    prompts = distill_prompts(recipe.distill_prompts, recipe.seed)
    sampling = SamplingParams(max_new_tokens=recipe.distill_max_tokens)
    spec = SpecConfig(drafter="prompt-lookup", controller="heuristic")
    sequences = []
    with path.open("a") as log:
        for prompt in tqdm(prompts, desc="target answers (self-distillation)", unit="prompt"):
            ids = llm.encode_prompt(prompt)
            if prompt not in done:
                answer, _, _ = llm.engine.generate(ids, sampling, spec)
                done[prompt] = answer
                row = {"model": llm.name, "prompt": prompt, "answer": answer}
                log.write(json.dumps(row) + "\n")
                log.flush()
            tokens = ids + done[prompt]
            mask = [False] * (len(ids) - 1) + [True] * (len(tokens) - len(ids) + 1)
            sequences.append(TrainingSequence(tokens, mask, "self-distillation"))
    return sequences


def _sequences(llm, recipe: Recipe, user_texts: list[tuple[str, str]] | None, work: Path):
    def encode(text: str) -> list[int]:
        return llm.tokenizer.encode(text, add_special_tokens=False)

    if user_texts:
        return text_sequences(user_texts, encode, 1 << 62, recipe.sequence_length)
    sequences = text_sequences(
        stdlib_texts(recipe.seed), encode, recipe.stdlib_tokens, recipe.sequence_length
    )
    if recipe.distill_prompts:
        sequences += _distilled(llm, recipe, work)
    return sequences


def train_drafter(
    model: str,
    kind: str = "eagle",
    out: str | Path | None = None,
    data: Sequence[str] | None = None,
    recipe: Recipe | None = None,
    settings: TrainSettings | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Make `model`'s draft head of `kind` (see the module docstring); the Python entry point of
    `specdecode train-drafter`."""
    from specdecode.api import SpecDecoder
    from specdecode.models import resolve_model

    if kind not in HEAD_KINDS:
        raise SpecDecodeError(f"unknown head kind {kind!r}; choose one of: {', '.join(HEAD_KINDS)}")
    recipe = recipe or Recipe()
    settings = settings or TrainSettings()
    user_texts = read_user_files(data) if data else None  # a bad file fails before any load
    model = resolve_model(model)
    head_dir = Path(out).expanduser() if out else default_head_dir(model, kind)
    work = head_dir / "training"
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    # Room for the longest sequence: a text piece, or an instruction (under 512 tokens) and its
    # answer.
    context = max(recipe.sequence_length, 512 + recipe.distill_max_tokens) + 1
    llm = SpecDecoder.load(model, backend="torch", max_context=context)
    target = llm.target
    config = target.model_config
    head_config = Eagle3Config.for_target(config, settings.draft_vocab, settings.intermediate_size)
    seconds["load"] = time.perf_counter() - started

    started = time.perf_counter()
    sequences = _sequences(llm, recipe, user_texts, work)
    if len(sequences) < 2:
        raise SpecDecodeError("the training data makes fewer than 2 sequences: give more text")
    seconds["data"] = time.perf_counter() - started

    started = time.perf_counter()
    store = FeatureStore(work / "features", head_config.aux_layers, str(model))
    store.compute(target, sequences)
    examples = store.load(sequences)
    seconds["features"] = time.perf_counter() - started

    started = time.perf_counter()
    model_weights = target.model
    head, report = train_eagle(
        examples,
        head_config,
        model_weights.embed.weight.detach(),
        model_weights.lm_head.weight.detach(),
        model_weights.final_norm.detach(),
        settings,
        work,
        stop_after=stop_after,
    )
    seconds["training"] = time.perf_counter() - started
    tokens = sum(len(s.tokens) for s in sequences)
    head.cfg = Eagle3Config(
        **{
            **asdict(head.cfg),
            "provenance": {
                "trained_by": "specdecode train-drafter",
                "target": str(model),
                "kind": kind,
                "data": list(data) if data else asdict(recipe),
                "settings": asdict(settings),
                "sequences": len(sequences),
                "tokens": tokens,
                "heldout_agreement_by_step": report.agreement,
                "seconds": seconds,
            },
        }
    )
    save_head(head, head_dir)
    return TrainResult(head_dir, report, len(sequences), tokens, seconds)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train-drafter",
        help="train a draft head (EAGLE-3) on a model's own hidden states",
        description="Train an EAGLE-3 draft head for MODEL on this machine, offline: on the "
        "Python standard library's source and docstrings and the model's own answers to "
        "generated instructions (or on --data FILES), never on the benchmark's prompts. The "
        "target's features are computed once and cached; an interrupted run resumes when "
        "started again with the same command. The head is saved in the layout vLLM and SGLang "
        "load (config.json, model.safetensors) and used with --drafter eagle.",
    )
    p.add_argument("--model", required=True, help="the target: registry name, GGUF file or HF dir")
    p.add_argument("--kind", choices=HEAD_KINDS, default="eagle", help="the head (default eagle)")
    p.add_argument(
        "--out",
        default=None,
        help="where to write the head (default: the model's own head in the cache, which "
        "--drafter eagle uses when no --head is given)",
    )
    p.add_argument("--data", nargs="+", metavar="FILE", help="train on these text files instead")
    defaults, recipe = TrainSettings(), Recipe()
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=defaults.draft_vocab,
        help=f"draft vocabulary size (default {defaults.draft_vocab})",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=defaults.epochs,
        help=f"passes over the data (default {defaults.epochs})",
    )
    p.add_argument(
        "--ttt-steps",
        type=int,
        default=defaults.ttt_steps,
        help=f"draft steps of the training-time test (default {defaults.ttt_steps})",
    )
    p.add_argument(
        "--intermediate-size",
        type=int,
        default=None,
        help="the head's MLP width (default: the target's)",
    )
    p.add_argument(
        "--learning-rate",
        type=float,
        default=defaults.learning_rate,
        help=f"peak learning rate (default {defaults.learning_rate:g})",
    )
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=defaults.batch_tokens,
        help=f"tokens per optimizer step (default {defaults.batch_tokens})",
    )
    p.add_argument(
        "--stdlib-tokens",
        type=int,
        default=recipe.stdlib_tokens,
        help=f"tokens of standard-library text (default {recipe.stdlib_tokens})",
    )
    p.add_argument(
        "--distill-prompts",
        type=int,
        default=recipe.distill_prompts,
        help=f"instructions the model answers for training (default {recipe.distill_prompts})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    recipe = Recipe(
        stdlib_tokens=args.stdlib_tokens, distill_prompts=args.distill_prompts, seed=args.seed
    )
    settings = TrainSettings(
        draft_vocab=args.draft_vocab,
        intermediate_size=args.intermediate_size,
        ttt_steps=args.ttt_steps,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_tokens=args.batch_tokens,
        seed=args.seed,
    )
    result = train_drafter(args.model, args.kind, args.out, args.data, recipe, settings)
    report = result.report
    agreement = " ".join(f"{a:.3f}" for a in report.agreement)
    initial = " ".join(f"{a:.3f}" for a in report.initial_agreement)
    minutes = sum(result.seconds.values()) / 60
    print(f"head: {result.head_dir}")
    print(
        f"data: {result.sequences} sequences, {result.tokens} tokens "
        f"({report.train_tokens} trained, {report.heldout_tokens} held out)"
    )
    print(
        f"held-out agreement with the target by draft step: {agreement} (before training "
        f"{initial}; most frequent token {report.baseline:.3f})"
    )
    print(
        f"expected tokens per target forward on a chain: {report.expected_tokens_per_forward:.2f}"
    )
    print(
        "time: "
        + ", ".join(f"{name} {value / 60:.1f} min" for name, value in result.seconds.items())
        + f"; {minutes:.1f} min in all"
    )
    print(
        f"use it: specdecode generate PROMPT --model {args.model} --drafter eagle"
        + (f" --head {result.head_dir}" if args.out else "")
    )
    return 0
