"""`specdecode bench`: run a suite with a set of methods and write records, report and plots."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from specdecode.bench import settings as run_settings
from specdecode.errors import SpecDecodeError


def add_parser(sub, add_draft_quantize) -> None:
    from specdecode.api import DEFAULT_MODEL
    from specdecode.bench.methods import BUILTIN, PEERS, SETS
    from specdecode.bench.suites import SUITES
    from specdecode.cli import add_backend_args, positive_int

    p = sub.add_parser(
        "bench",
        help="measure methods against plain decoding, side by side",
        description="Run every method on every prompt of a suite, interleaved prompt by prompt "
        "with plain decoding through the same engine, and report speed-ups as geometric means of "
        "per-prompt ratios. With --out, each run is appended to DIR/results.jsonl as it finishes "
        "(so an interrupted run keeps its records; --resume continues it), and DIR/report.md and "
        "PNG plots are written at the end (after an interruption too, over the prompts every "
        "method finished; --report-only rewrites them from the records).",
        epilog="methods: "
        + ", ".join(BUILTIN)
        + "; sets: "
        + ", ".join(SETS)
        + "; peers: "
        + ", ".join(PEERS)
        + ". suites: "
        + "; ".join(f"{name} ({text})" for name, text in SUITES.items()),
    )
    p.add_argument(
        "--suite", default="quick", help="suite name or a .jsonl file of prompts (default: quick)"
    )
    p.add_argument(
        "--methods",
        default="quick",
        help="comma-separated method and set names, or a .toml methods file (default: quick)",
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"target model (default: {DEFAULT_MODEL})"
    )
    p.add_argument("--draft-model", help="draft model for draft-model methods and hf-assisted")
    p.add_argument("--categories", help="comma-separated categories to run (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default: 128")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="default: 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, metavar="R", help="default: 1")
    add_backend_args(
        p,
        "model backend of the baseline and of every method that names none (default: torch); "
        "a methods file may put single methods on another backend, which then gets its own "
        "baseline none-BACKEND for the exactness check",
    )
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument(
        "--threads", type=positive_int, metavar="N", help="CPU threads (default: all cores)"
    )
    p.add_argument("--out", metavar="DIR", help="write results.jsonl, report.md and plots here")
    p.add_argument(
        "--resume", action="store_true", help="keep DIR/results.jsonl and run only what is missing"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write DIR/report.md and plots from the records in DIR/results.jsonl, "
        "for the methods and suite given (a partial run counts the prompts every method finished)",
    )
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="skip peer baselines whose package is not installed (with a warning) instead of "
        "stopping",
    )
    add_draft_quantize(p)
    p.set_defaults(func=run)


def _prepare_out_dir(out: str, resume: bool) -> Path:
    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise SpecDecodeError(f"cannot write to {out_dir}: {exc.strerror}") from None
    results = out_dir / "results.jsonl"
    if results.exists() and results.stat().st_size and not resume:
        raise SpecDecodeError(
            f"{results} already holds records: pass --resume to continue that run, or choose "
            "another --out"
        )
    return out_dir


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from specdecode.api import BACKEND_NAMES, SpecDecoder
    from specdecode.bench.methods import parse_methods
    from specdecode.bench.peers import (
        SERVER_FLAGS,
        HFPeer,
        LlamaCppPeer,
        LlamaServerPeer,
        missing_package,
    )
    from specdecode.bench.runner import Runner, append_record, methods_by_run, read_records
    from specdecode.bench.suites import load_suite
    from specdecode.cli import backend_from_args
    from specdecode.config import SamplingParams
    from specdecode.models import resolve_model

    if args.repeats < 1:
        raise SpecDecodeError(f"--repeats must be at least 1, got {args.repeats}")
    # From here on the run's backend is the benchmark's name of the backend on its kernels
    # (`llamacpp-narrow`), as methods files, records and settings files name it.
    args.backend = backend_from_args(args)
    # A Hugging Face id names its snapshot in the local cache, for the peers as for ours.
    args.model = resolve_model(args.model)
    if args.draft_model:
        args.draft_model = resolve_model(args.draft_model)
    if args.resume and not args.out:
        raise SpecDecodeError("--resume needs --out DIR, the directory of the run to continue")
    methods = parse_methods(args.methods, has_draft_model=bool(args.draft_model))
    needing = [m.name for m in methods if m.needs_draft_model]
    if needing and not args.draft_model:
        raise SpecDecodeError(f"{', '.join(needing)} need --draft-model NAME|PATH")
    _check_heads(methods, args.model)
    categories = args.categories.split(",") if args.categories else None
    prompts = load_suite(args.suite, categories)
    if args.report_only:
        return _report_only(args, methods, prompts)
    for method in [m for m in methods if m.peer]:
        hint = missing_package(method.peer)
        if hint and args.skip_missing:
            print(
                f"warning: skipping {method.name}: its package is missing ({hint})",
                file=sys.stderr,
            )
            methods.remove(method)
        elif hint:
            raise SpecDecodeError(
                f"{method.name} needs a package that is not installed: {hint}, or pass "
                "--skip-missing"
            )
    sampling = SamplingParams(
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed
    )
    out_dir = _prepare_out_dir(args.out, args.resume) if args.out else None
    done = []
    if out_dir is not None and args.resume and (out_dir / "results.jsonl").exists():
        done = read_records(out_dir / "results.jsonl")
    settings = run_settings.of_command(args, methods)
    if out_dir is not None and args.resume:
        run_settings.check(out_dir, settings, {r.method for r in done})

    def load(backend: str) -> SpecDecoder:
        on_backend = [
            m for m in methods if m.peer is None and (m.backend or args.backend) == backend
        ]
        base, kernels = BACKEND_NAMES[backend]
        return SpecDecoder.load(
            args.model,
            draft_model=args.draft_model if any(m.needs_draft_model for m in on_backend) else None,
            backend=base,
            kernels=kernels,
            dtype=args.dtype,
            threads=args.threads,
            draft_quantize=None if args.draft_quantize == "none" else args.draft_quantize,
            draft_vocabulary=args.draft_vocabulary or None,
        )

    _reserve_llamacpp_kernels(args, methods)
    llm = load(args.backend)
    # After loading: --threads is applied there, and the thread count is part of the machine.
    _check_same_machine(done, out_dir)
    other_backends = {
        backend: load(backend)
        for backend in sorted({m.backend for m in methods if m.backend} - {args.backend})
    }
    peers: dict = {}
    hf_kinds = {m.peer for m in methods if m.peer and m.peer.startswith("hf-")}
    if hf_kinds:
        draft = args.draft_model if "hf-assisted" in hf_kinds else None
        hf = HFPeer(args.model, draft, llm.target_dtype)
        peers.update(dict.fromkeys(hf_kinds, hf))
    import torch

    threads = torch.get_num_threads()
    if any(m.peer == "llamacpp-ar" for m in methods):
        peers["llamacpp-ar"] = LlamaCppPeer(args.model, threads=threads)
    for kind in sorted({m.peer for m in methods if m.peer in SERVER_FLAGS}):
        peers[kind] = LlamaServerPeer(kind, args.model, threads=threads)
    runner = Runner(llm, methods, sampling, peers, args.backend, other_backends)
    llamacpp_ar = any(m.peer == "llamacpp-ar" for m in methods)
    loaded = {args.backend: llm, **other_backends}
    settings["settings"].update(run_settings.of_loaded(loaded, llamacpp_ar))
    if out_dir is not None and args.resume:
        run_settings.check(out_dir, settings, {r.method for r in done})
    if out_dir is not None:  # once everything loaded: a run that never started records nothing
        run_settings.write(out_dir, settings)

    names = {m.name for m in runner.methods}
    ids = {p.id for p in prompts}
    done = [r for r in done if r.method in names and r.prompt_id in ids and r.repeat < args.repeats]
    # A prompt's methods must run side by side for their ratios to cancel the machine's drift: a
    # prompt run cut off mid-way is run again whole, and its new records replace the old.
    cut = {pair for pair, ran in methods_by_run(done).items() if ran != names}
    if cut:
        print(f"running {len(cut)} prompt(s) cut off mid-way again, whole", file=sys.stderr)
        done = [r for r in done if (r.prompt_id, r.repeat) not in cut]
    total = len(prompts) * args.repeats * len(runner.methods)
    bar = tqdm(total=total, initial=len(done), desc="bench", unit="run", file=sys.stderr)
    results = out_dir / "results.jsonl" if out_dir else None

    def sink(record) -> None:
        if results is not None:
            append_record(record, results)
        bar.set_postfix_str(
            f"{record.method} | {record.category} | {record.prompt_id} | "
            f"{record.tokens_per_second:.2f} tok/s"
        )
        bar.update(1)

    # A stop request (kill, a job scheduler's time limit) ends the run as Ctrl-C does: a run put
    # in the background by a shell ignores Ctrl-C's signal, and would otherwise lose its report.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        records = runner.run(prompts, args.repeats, sink, done)
    except KeyboardInterrupt:
        bar.close()
        if results is None:
            print("\ninterrupted", file=sys.stderr)
            return 130
        where = f"records so far are in {results}, continue with --resume"
        print(f"\ninterrupted; {where}", file=sys.stderr)
        _write_report(args, read_records(results), runner.methods, prompts, out_dir)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()
    return _write_report(args, records, runner.methods, prompts, out_dir)


def _reserve_llamacpp_kernels(args: argparse.Namespace, methods: list) -> None:
    """llama.cpp reads its tiled kernel's switch once, at its start, and the matched kernels must
    be in place before it: every llama.cpp kernel of the run is reserved before the first model
    loads. (Drafts run the stock kernels, which need nothing.)"""
    from specdecode.api import LLAMACPP_KERNELS, llamacpp_kernels
    from specdecode.backends.llamacpp import require_llama_cpp, reserve_kernels
    from specdecode.models import resolve_gguf

    backends = {args.backend} | {m.backend or args.backend for m in methods if m.peer is None}
    llamacpp = sorted(backends & LLAMACPP_KERNELS.keys())
    if not llamacpp:
        return
    require_llama_cpp()  # before a model is installed for nothing
    path = resolve_gguf(args.model)
    if path is not None:  # else loading says what is wrong
        reserve_kernels([llamacpp_kernels(backend, path) for backend in llamacpp])


def _check_heads(methods, model: str) -> None:
    """Refuse, before anything runs, a trained-head method without a head for the model."""
    from specdecode.heads import HEAD_KINDS, default_head_dir, train_command

    for method in methods:
        spec = method.spec
        if spec is None or spec.drafter not in HEAD_KINDS or "head" in spec.drafter_options:
            continue
        kind = spec.drafter
        if not (default_head_dir(model, kind) / "config.json").is_file():
            raise SpecDecodeError(
                f"{method.name} needs a trained {kind} head for {model}: make it with "
                f"`{train_command(model, kind)}`, or name one with drafter_options.head in a "
                "methods file"
            )


def _check_same_machine(records, out_dir: Path) -> None:
    from specdecode.bench.runner import this_machine

    here = this_machine()
    others = sorted({r.machine for r in records if r.machine and r.machine != here})
    if others:
        raise SpecDecodeError(
            f"the records in {out_dir} were measured on {others[0]}, this machine is {here}: "
            "continue the run there, or start another with a new --out (speeds and ratios "
            "differ between machines)"
        )


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _report_only(args: argparse.Namespace, methods, prompts) -> int:
    from specdecode.bench.runner import read_records, run_order

    if not args.out:
        raise SpecDecodeError("--report-only needs --out DIR, the directory of the run")
    results = Path(args.out) / "results.jsonl"
    if not results.is_file():
        raise SpecDecodeError(f"no records at {results}: run the benchmark with --out first")
    records = read_records(results)
    settings = run_settings.of_command(args, methods)
    run_settings.check(Path(args.out), settings, {r.method for r in records})
    return _write_report(
        args, records, run_order(methods, args.backend)[0], prompts, Path(args.out)
    )


def _write_report(args: argparse.Namespace, records, methods, prompts, out_dir) -> int:
    """Print the report (and write it with plots into `out_dir`) over the (prompt, repeat) pairs
    that every method finished, so that all of them are compared on the same prompts; returns the
    exit code: 1 when a greedy output differed from plain decoding."""
    from specdecode.bench.report import plot, report
    from specdecode.bench.runner import methods_by_run

    names = {m.name for m in methods}
    wanted = {(p.id, repeat) for p in prompts for repeat in range(args.repeats)}
    complete = {
        pair for pair, ran in methods_by_run(records).items() if pair in wanted and ran >= names
    }
    records = [r for r in records if r.method in names and (r.prompt_id, r.repeat) in complete]
    if not records:
        print("no prompt has been run by every method yet: nothing to report", file=sys.stderr)
        return 1
    precision = "GGUF as quantized" if args.backend.startswith("llamacpp") else args.dtype
    products = run_settings.recorded(out_dir, "torch_products") if out_dir is not None else None
    if products is not None and args.backend == "torch":
        precision += f", products on {products}"
    settings = (
        f"Target `{args.model}` ({args.backend} backend, {precision})"
        + (f", draft `{args.draft_model}`" if any(m.needs_draft_model for m in methods) else "")
        + f"; suite `{args.suite}`, {len(prompts)} prompts x {args.repeats} repeats; "
        f"temperature {args.temperature}, {args.max_new_tokens} new tokens."
    )
    if len(complete) < len(wanted):
        by_category: dict[str, int] = {}
        for p in prompts:
            by_category[p.category] = by_category.get(p.category, 0) + sum(
                (p.id, repeat) in complete for repeat in range(args.repeats)
            )
        settings += (
            f"\n\n**Partial run: {len(complete)} of {len(wanted)} prompt runs finished by every "
            "method** (" + ", ".join(f"{c} {n}" for c, n in by_category.items()) + "); the tables "
            "cover those. Continue it with `--resume`."
        )
    # The command that reproduces the run: resuming and re-reporting do not change it.
    argv = [a for a in args.argv if a not in ("--resume", "--report-only")]
    tiles = "SPECDECODE_TILES=1 " if products == run_settings.AMX_TILES else ""
    text = report(records, tiles + "specdecode " + shlex.join(argv), settings)
    print(text)
    if out_dir is not None:
        (out_dir / "report.md").write_text(text)
        for path in plot(records, out_dir):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if any(r.exact is False for r in records) else 0
