"""`specdecode train-drafter`: data, target features, training and the saved head, in one command.

    specdecode train-drafter --model M --kind eagle|medusa|hydra|kangaroo [--out DIR] [--data F...]

The training data is kept in the model's data folder (`--work-dir`; by default one in the cache
that every head kind of the model shares): the target's answers to the self-distillation prompts
(`distill.jsonl`, appended as each is made) and the target features (`features/`, one file per
sequence and set of layers, those of the answers captured while they were written). The training
checkpoint is kept in `<out>/training/`. An interrupted run started again with the same command
picks up where it stopped: answers and features already on disk are not recomputed, and training
resumes from its last checkpoint. A second kind reuses the first one's answers (Medusa and Hydra,
which read other layers than EAGLE-3, compute their features once over them, and share those;
Kangaroo's adapter reads the input of its exit layer).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from specdecode.errors import SpecDecodeError
from specdecode.heads import HEAD_KINDS, default_data_dir, default_head_dir
from specdecode.heads.checkpoint import refuse_family
from specdecode.heads.eagle3 import Eagle3Config, save_head
from specdecode.heads.hydra import HydraConfig
from specdecode.heads.hydra import save_heads as save_hydra
from specdecode.heads.kangaroo import KangarooConfig, save_adapter
from specdecode.heads.medusa import MedusaConfig, save_heads
from specdecode.train.batched import Answer, generate_answers
from specdecode.train.data import (
    Recipe,
    TrainingSequence,
    bench_windows,
    distill_conversations,
    overlaps_bench,
    read_user_files,
    stdlib_texts,
    text_sequences,
)
from specdecode.train.eagle import TrainReport, TrainSettings, train_eagle
from specdecode.train.features import FeatureStore
from specdecode.train.hydra import train_hydra
from specdecode.train.kangaroo import ADAPTER_EPOCHS, train_kangaroo
from specdecode.train.medusa import train_medusa
from specdecode.train.prompts import Conversation, follow_up


@dataclass
class TrainResult:
    head_dir: Path
    report: TrainReport
    sequences: int
    tokens: int
    seconds: dict[str, float]


def _read_answers(path: Path, model: str) -> dict[str, list[int]]:
    """Answers already made, by conversation (lines of another model, or cut by an
    interruption, are made again)."""
    done: dict[str, list[int]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                if row["model"] == model:
                    done[json.dumps(row["conversation"])] = row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def _answer(
    llm,
    conversations: list[Conversation],
    recipe: Recipe,
    store: FeatureStore,
    done: dict[str, list[int]],
    log,
    description: str,
) -> list[tuple[Conversation, list[int], TrainingSequence]]:
    """The target's greedy answers to `conversations` (those with prompts of at most
    `distill_max_prompt` tokens), made in batches with their features, or read back."""
    prompts = [(c, llm.encode_chat(c)) for c in conversations]
    prompts = [(c, ids) for c, ids in prompts if len(ids) <= recipe.distill_max_prompt]
    todo = [k for k, (c, _) in enumerate(prompts) if json.dumps(c) not in done]

    def sequence(ids: list[int], answer: list[int]) -> TrainingSequence:
        # The last answer token is never fed: the prediction after it is not needed.
        tokens = ids + answer[:-1]
        mask = [False] * (len(ids) - 1) + [True] * len(answer)
        return TrainingSequence(tokens, mask, "self-distillation")

    if todo:
        bar = tqdm(total=len(todo), desc=description, unit="answer")

        def save(k: int, made: Answer) -> None:
            conversation, ids = prompts[todo[k]]
            store.save(sequence(ids, made.answer), made.features, made.labels)
            done[json.dumps(conversation)] = made.answer
            row = {"model": llm.name, "conversation": conversation, "answer": made.answer}
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(1)

        generate_answers(
            llm.target.model,
            [prompts[k][1] for k in todo],
            recipe.distill_max_tokens,
            llm.tokenizer.eos_token_ids,
            store.layers,
            batch=recipe.distill_batch,
            on_answer=save,
        )
        bar.close()
    made = []
    for conversation, ids in prompts:
        answer = done[json.dumps(conversation)]
        made.append((conversation, answer, sequence(ids, answer)))
    return made


def _distilled(llm, recipe: Recipe, data_dir: Path, store: FeatureStore) -> list[TrainingSequence]:
    """Self-distillation: the target's answers to the recipe's instructions, then to follow-up
    questions on some of those answers; cached in `distill.jsonl` and the feature store."""
    path = data_dir / "distill.jsonl"
    done = _read_answers(path, llm.name)
    eos = llm.tokenizer.eos_token_ids
    windows = bench_windows()
    with path.open("a") as log:
        first = _answer(
            llm,
            distill_conversations(recipe.distill_prompts, recipe.seed),
            recipe,
            store,
            done,
            log,
            "target answers (self-distillation)",
        )
        rng = random.Random(recipe.seed)
        picked = sorted(rng.sample(range(len(first)), min(recipe.follow_ups, len(first))))
        second = []
        for k in picked:
            conversation, answer, _ = first[k]
            reply = llm.tokenizer.decode([t for t in answer if t not in eos])
            turns = follow_up(conversation, reply, rng)
            if not overlaps_bench(" ".join(m["content"] for m in turns), windows):
                second.append(turns)
        follow = _answer(llm, second, recipe, store, done, log, "target answers (follow-ups)")
    return [made[2] for made in first + follow]


def _sequences(
    llm,
    recipe: Recipe,
    user_texts: list[tuple[str, str]] | None,
    data_dir: Path,
    store: FeatureStore,
) -> list[TrainingSequence]:
    def encode(text: str) -> list[int]:
        return llm.tokenizer.encode(text, add_special_tokens=False)

    if user_texts:
        return text_sequences(user_texts, encode, 1 << 62, recipe.sequence_length)
    sequences = text_sequences(
        stdlib_texts(recipe.seed), encode, recipe.stdlib_tokens, recipe.sequence_length
    )
    if recipe.distill_prompts:
        sequences += _distilled(llm, recipe, data_dir, store)
    return sequences


def default_epochs(kind: str) -> int:
    """Passes over the data unless told: Kangaroo's small adapter trains in minutes and gained
    at every epoch up to its sixth on the 1.5B (0.39 held-out agreement after 3, 0.44 after 8)."""
    return ADAPTER_EPOCHS if kind == "kangaroo" else TrainSettings().epochs


def train_drafter(
    model: str,
    kind: str = "eagle",
    out: str | Path | None = None,
    data: Sequence[str] | None = None,
    recipe: Recipe | None = None,
    settings: TrainSettings | None = None,
    stop_after: int | None = None,
    work_dir: str | Path | None = None,
    exit_layer: int | None = None,
) -> TrainResult:
    """Make `model`'s draft head of `kind` (see the module docstring); the Python entry point of
    `specdecode train-drafter`. `exit_layer`: kangaroo's (None: `default_exit_layer`)."""
    from specdecode.api import SpecDecoder
    from specdecode.models import resolve_model

    if kind not in HEAD_KINDS:
        raise SpecDecodeError(f"unknown head kind {kind!r}; choose one of: {', '.join(HEAD_KINDS)}")
    if exit_layer is not None and kind != "kangaroo":
        raise SpecDecodeError(f"--exit-layer is the kangaroo adapter's; the kind is {kind}")
    if exit_layer is not None and exit_layer < 1:
        raise SpecDecodeError(f"the exit layer must be at least 1, got {exit_layer}")
    recipe = recipe or Recipe()
    settings = settings or TrainSettings(epochs=default_epochs(kind))
    user_texts = read_user_files(data) if data else None  # a bad file fails before any load
    model = resolve_model(model)
    head_dir = Path(out).expanduser() if out else default_head_dir(model, kind)
    work = head_dir / "training"
    work.mkdir(parents=True, exist_ok=True)
    data_dir = Path(work_dir).expanduser() if work_dir else default_data_dir(model)
    data_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    # Room for the longest sequence: a text piece, or an instruction and its answer.
    context = max(recipe.sequence_length, recipe.distill_max_prompt + recipe.distill_max_tokens)
    llm = SpecDecoder.load(model, backend="torch", max_context=context + 1)
    target = llm.target
    config = target.model_config
    if kind == "eagle":
        head_config = Eagle3Config.for_target(
            config, settings.draft_vocab, settings.intermediate_size
        )
        layers = tuple(head_config.aux_layers)
    elif kind == "kangaroo":
        refuse_family(config)
        adapter_config = KangarooConfig.for_target(config, exit_layer)
        layers = (adapter_config.exit_layer,)
    else:  # medusa and hydra: the last layer's output
        refuse_family(config)
        layers = (config.num_layers,)
    store = FeatureStore(data_dir / "features", layers, str(model))
    seconds["load"] = time.perf_counter() - started

    started = time.perf_counter()
    sequences = _sequences(llm, recipe, user_texts, data_dir, store)
    if len(sequences) < 2:
        raise SpecDecodeError("the training data makes fewer than 2 sequences: give more text")
    seconds["data"] = time.perf_counter() - started

    started = time.perf_counter()
    store.compute(target, sequences)
    examples = store.load(sequences)
    seconds["features"] = time.perf_counter() - started

    started = time.perf_counter()
    weights = target.model
    tokens = sum(len(s.tokens) for s in sequences)

    def provenance(report: TrainReport) -> dict:
        return {
            "trained_by": "specdecode train-drafter",
            "target": str(model),
            "kind": kind,
            "data": list(data) if data else asdict(recipe),
            "settings": asdict(settings),
            "sequences": len(sequences),
            "tokens": tokens,
            "train_tokens": report.train_tokens,
            "heldout_tokens": report.heldout_tokens,
            "heldout_agreement_by_step": report.agreement,
            "seconds": seconds,
        }

    if kind == "eagle":
        head, report = train_eagle(
            examples,
            head_config,
            weights.embed.weight.detach(),
            weights.lm_head.weight.detach(),
            weights.final_norm.detach(),
            settings,
            work,
            stop_after=stop_after,
        )
        seconds["training"] = time.perf_counter() - started
        head.cfg = Eagle3Config(**{**asdict(head.cfg), "provenance": provenance(report)})
        save_head(head, head_dir)
    elif kind == "medusa":
        heads, report = train_medusa(
            examples,
            MedusaConfig(config.hidden_size, config.vocab_size, settings.num_heads),
            weights.lm_head.weight.detach(),
            weights.final_norm.detach(),
            config.rms_norm_eps,
            settings,
            work,
            stop_after=stop_after,
        )
        seconds["training"] = time.perf_counter() - started
        heads.cfg = MedusaConfig(
            **{**asdict(heads.cfg), "base_model": str(model), "provenance": provenance(report)}
        )
        save_heads(heads, weights.lm_head.weight.detach(), head_dir)
    elif kind == "kangaroo":
        adapter, report = train_kangaroo(
            examples,
            adapter_config,
            weights.lm_head.weight.detach(),
            weights.final_norm.detach(),
            settings,
            work,
            stop_after=stop_after,
        )
        seconds["training"] = time.perf_counter() - started
        adapter.cfg = replace(adapter.cfg, base_model=str(model), provenance=provenance(report))
        save_adapter(adapter, head_dir)
    else:
        hydra, report = train_hydra(
            examples,
            HydraConfig(config.hidden_size, config.vocab_size, settings.num_heads),
            weights.embed.weight.detach(),
            weights.lm_head.weight.detach(),
            weights.final_norm.detach(),
            config.rms_norm_eps,
            settings,
            work,
            stop_after=stop_after,
        )
        seconds["training"] = time.perf_counter() - started
        hydra.cfg = HydraConfig(
            **{**asdict(hydra.cfg), "base_model": str(model), "provenance": provenance(report)}
        )
        save_hydra(hydra, head_dir)
    return TrainResult(head_dir, report, len(sequences), tokens, seconds)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train-drafter",
        help="train a draft head (EAGLE-3, Medusa-1, Hydra or a Kangaroo adapter) on a model's "
        "own hidden states",
        description="Train a draft head for MODEL on this machine, offline (--kind eagle: an "
        "EAGLE-3 head; --kind medusa: Medusa-1 heads; --kind hydra: Hydra heads; --kind "
        "kangaroo: Kangaroo's adapter after the first layers): on the "
        "model's own answers to generated instructions and follow-up questions (made many at "
        "a time) and a little of the Python standard library's source and docstrings (or on "
        "--data FILES), never on the benchmark's prompts. The "
        "target's features are computed once and cached; an interrupted run resumes when "
        "started again with the same command. An EAGLE-3 head is saved in the layout vLLM and "
        "SGLang load (config.json, model.safetensors), Medusa heads in the Medusa repository's "
        "(config.json, medusa_lm_head.safetensors), Hydra heads beside theirs (config.json, "
        "hydra_heads.safetensors), a Kangaroo adapter as config.json and "
        "kangaroo_adapter.safetensors; use them with --drafter eagle, medusa, hydra or kangaroo.",
    )
    p.add_argument("--model", required=True, help="the target: registry name, GGUF file or HF dir")
    p.add_argument(
        "--kind",
        choices=HEAD_KINDS,
        default="eagle",
        help="eagle (EAGLE-3: one decoder layer over three target layers, drafting step by step) "
        "or medusa (Medusa-1: heads on the last hidden state, each one token further ahead) or "
        "hydra (Medusa's heads, each also reading the tokens drafted above it) or kangaroo (an "
        "attention-only adapter after the target's first layers, for --drafter kangaroo); "
        "default eagle",
    )
    p.add_argument(
        "--out",
        default=None,
        help="where to write the head (default: the model's own head of that kind in the "
        "cache, which --drafter KIND uses when no --head is given)",
    )
    p.add_argument("--data", nargs="+", metavar="FILE", help="train on these text files instead")
    p.add_argument(
        "--work-dir",
        default=None,
        metavar="DIR",
        help="where the model's answers and the target features are kept (default: a folder "
        "in the cache that all the model's head kinds share, so a second kind reuses the "
        "answers)",
    )
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
        default=None,
        help=f"passes over the data (default {defaults.epochs}; kangaroo {ADAPTER_EPOCHS})",
    )
    p.add_argument(
        "--ttt-steps",
        type=int,
        default=defaults.ttt_steps,
        help=f"eagle: draft steps of the training-time test (default {defaults.ttt_steps})",
    )
    p.add_argument(
        "--num-heads",
        type=int,
        default=defaults.num_heads,
        help="medusa and hydra: heads, each predicting one more token ahead "
        f"(default {defaults.num_heads})",
    )
    p.add_argument(
        "--exit-layer",
        type=int,
        default=None,
        help="kangaroo: the adapter reads the input of this target layer, drafting with the "
        "layers below it (default: Kangaroo's 2 of 32 layers, scaled to the model's depth)",
    )
    p.add_argument(
        "--intermediate-size",
        type=int,
        default=None,
        help="eagle: the head's MLP width (default: the target's)",
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
    p.add_argument(
        "--follow-ups",
        type=int,
        default=recipe.follow_ups,
        help="second turns: follow-up questions on that many of the model's answers "
        f"(default {recipe.follow_ups})",
    )
    p.add_argument(
        "--train-fraction",
        type=float,
        default=defaults.train_fraction,
        help="train on this share of the training sequences (the held-out ones stay the "
        "same): a learning curve's points (default 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    recipe = Recipe(
        stdlib_tokens=args.stdlib_tokens,
        distill_prompts=args.distill_prompts,
        follow_ups=args.follow_ups,
        seed=args.seed,
    )
    settings = TrainSettings(
        draft_vocab=args.draft_vocab,
        intermediate_size=args.intermediate_size,
        ttt_steps=args.ttt_steps,
        num_heads=args.num_heads,
        epochs=default_epochs(args.kind) if args.epochs is None else args.epochs,
        learning_rate=args.learning_rate,
        batch_tokens=args.batch_tokens,
        train_fraction=args.train_fraction,
        seed=args.seed,
    )
    result = train_drafter(
        args.model,
        args.kind,
        args.out,
        args.data,
        recipe,
        settings,
        work_dir=args.work_dir,
        exit_layer=args.exit_layer,
    )
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
        f"use it: specdecode generate PROMPT --model {args.model} --drafter {args.kind}"
        + (f" --head {result.head_dir}" if args.out else "")
    )
    return 0
