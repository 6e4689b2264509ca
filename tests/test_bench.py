"""The benchmark harness itself, on the quick suite with the smallest model of the registry."""

from __future__ import annotations

import argparse
import inspect
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from specdecode.api import BACKEND_NAMES
from specdecode.bench import runner as runner_module
from specdecode.bench import settings as run_settings
from specdecode.bench.methods import BUILTIN, PEERS, SETS, parse_methods
from specdecode.bench.peers import LlamaCppPeer
from specdecode.bench.report import acceptance_by_depth, speedups
from specdecode.bench.report import report as render_report
from specdecode.bench.runner import Record, read_records, this_machine
from specdecode.bench.suites import load_suite
from specdecode.cli import main
from specdecode.config import SamplingParams
from specdecode.errors import SpecDecodeError
from specdecode.verify import VERIFIERS
from specdecode.verify.base import Verdict, Verifier

TINY = "smollm2-135m-instruct"
FAST = ["--model", TINY, "--suite", "quick", "--max-new-tokens", "12"]
CATEGORIES = ["--categories", "code-editing,rag"]  # inputs the answers repeat: drafts happen


def bench(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "run"
    code = main(["bench", *FAST, *CATEGORIES, "--out", str(out), *extra])
    return code, out


@pytest.fixture(scope="module")
def lookup_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run of prompt lookup beside its baseline, which several tests start from:
    each works on its own copy (`copy_of`)."""
    code, out = bench(tmp_path_factory.mktemp("lookup"), "--methods", "prompt-lookup")
    assert code == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run where `bench(tmp_path, ...)` writes, to resume or report on."""
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_every_suite_has_its_categories_and_origins() -> None:
    full = load_suite("spec-bench")
    categories = {p.category for p in full}
    assert categories == {
        "multi-turn",
        "summarization",
        "rag",
        "math-reasoning",
        "code-completion",
        "code-editing",
    }
    for category in categories:
        assert sum(p.category == category for p in full) >= 20
    assert all(p.origin for p in full)
    quick = load_suite("quick")
    assert {p.category for p in quick} == categories and len(quick) == 12
    chat = next(p for p in full if p.messages)
    assert chat.chat()[-1]["role"] == "user" and len(chat.chat()) == 3


def test_records_are_complete_and_runs_interleaved(tmp_path: Path) -> None:
    code, out = bench(tmp_path, "--methods", "prompt-lookup,prompt-lookup-k10")
    assert code == 0
    records = read_records(out / "results.jsonl")
    assert len(records) == 4 * 3  # 4 prompts x (baseline + 2 methods)
    # Interleaved: every prompt's baseline, then its methods, before the next prompt starts.
    order = [(r.prompt_id, r.method) for r in records]
    prompts = list(dict.fromkeys(p for p, _ in order))
    assert order == [
        (p, m) for p in prompts for m in ("none", "prompt-lookup", "prompt-lookup-k10")
    ]
    for r in records:
        assert r.new_tokens > 0 and r.seconds > 0 and r.tokens_per_second > 0
        assert r.peak_memory_mb > 100  # the model alone is bigger than that
        assert r.target_forwards and r.acceptance_histogram
        assert sum(r.acceptance_histogram) == r.target_forwards
        assert r.exact is (None if r.method == "none" else True)
        parts = [r.prefill_seconds, r.drafting_seconds, r.verifying_seconds, r.other_seconds]
        assert all(p is not None and p >= -1e-6 for p in parts)
        assert abs(sum(parts) - r.seconds) < 1e-6
        assert r.finished_at is not None and r.finished_at.endswith("+00:00")
        assert r.machine == this_machine()
    assert [r.finished_at for r in records] == sorted(r.finished_at for r in records)
    assert any(r.mean_accepted_tokens > 1 for r in records if r.method != "none")
    report = (out / "report.md").read_text()
    assert "## Overall" in report and "## code-editing" in report and "## rag" in report
    assert "EXACTNESS" not in report and "Command: `specdecode bench" in report
    assert (out / "speedup.png").stat().st_size > 0 and (out / "accepted.png").exists()
    for r in records:
        drafted, accepted = r.drafted_at_depth, r.accepted_at_depth
        assert drafted == sorted(drafted, reverse=True)  # a step drafting depth d drafted d-1
        assert len(accepted) <= len(drafted) and all(map(int.__le__, accepted, drafted))
        assert sum(accepted) == sum(d * n for d, n in enumerate(r.acceptance_histogram))
    assert any(r.drafted_at_depth for r in records if r.method != "none")
    products = run_settings.recorded(out, "torch_products")
    assert products in ("library", "row-wise kernels") and f"products on {products}" in report


def test_built_in_methods_keep_the_controllers_their_records_were_made_with(
    tmp_path: Path,
) -> None:
    """The default controller of generate changed to cost-aware; the benchmark's names did not
    change meaning: a name says cost-aware or a fixed length, or the method is heuristic (the
    plain-decoding baseline too, which drafts nothing)."""
    for name, method in BUILTIN.items():
        if method.spec is None:  # a peer
            continue
        if "cost-aware" in name:
            expected = "cost-aware"
        elif re.search(r"-k\d+$", name):  # a fixed length, named
            expected = "fixed"
        else:
            expected = "heuristic"
        assert method.spec.controller == expected, name
    path = tmp_path / "m.toml"
    path.write_text('[[method]]\nname = "m"\ndrafter = "prompt-lookup"\n')
    assert parse_methods(str(path))[0].spec.controller == "heuristic"  # a file's names none


def test_every_run_prefills_its_own_prompt(monkeypatch) -> None:
    """The backend keeps a prompt cached for the next generation of the same prompt; in the
    benchmark that would hand every method after the baseline a free prefill."""
    from specdecode import SpecDecoder
    from specdecode.bench.runner import Runner
    from specdecode.config import SamplingParams

    llm = SpecDecoder.load(TINY)
    prompt = load_suite("quick", ["code-editing"])[0]
    runner = Runner(llm, parse_methods("prompt-lookup,prompt-lookup-k10"), SamplingParams())
    prompt_ids = runner.encode(prompt)
    prefilled: list[int] = []
    real_extend = llm.target.extend
    monkeypatch.setattr(
        llm.target, "extend", lambda tokens: prefilled.append(len(tokens)) or real_extend(tokens)
    )
    monkeypatch.setattr(runner, "warm_up", lambda ids: None)  # only the measured runs
    records = runner.run([prompt])
    assert len(records) == 3
    assert prefilled == [len(prompt_ids) - 1] * 3  # the whole prompt but its last token, each


def test_speedups_are_ratios_of_runs_on_the_same_prompt_and_repeat() -> None:
    def record(method: str, prompt: str, repeat: int, tps: float) -> Record:
        return Record(method, prompt, "c", repeat, 10, 10 / tps, tps, 1.0)

    records = [
        record("none", "a", 0, 2.0),
        record("x", "a", 0, 4.0),
        record("none", "b", 0, 10.0),
        record("x", "b", 0, 5.0),
        record("none", "a", 1, 1.0),
        record("x", "a", 1, 3.0),
    ]
    ratios = speedups(records)
    assert sorted(ratios[("c", "x")]) == [0.5, 2.0, 3.0]
    assert ratios[("overall", "x")] == ratios[("c", "x")]


def test_the_report_tabulates_speed_ups_by_category() -> None:
    def record(method: str, prompt: str, category: str, tps: float) -> Record:
        return Record(method, prompt, category, 0, 10, 10 / tps, tps, 1.0, machine="M, 2 threads")

    records = [
        record("none", "a", "math", 2.0),
        record("x", "a", "math", 4.0),
        record("none", "b", "rag", 4.0),
        record("x", "b", "rag", 2.0),
        record("none", "c", "rag", 1.0),
        record("x", "c", "rag", 8.0),
    ]
    text = render_report(records, "specdecode bench")
    table = text[text.index("## Speed-up by category") :].splitlines()
    assert table[2] == "| method | math | rag | overall | tokens/s |"
    # rag: the geometric mean of 0.5 and 8; overall: of 2, 0.5 and 8; tokens/s: mean of 4, 2, 8.
    assert table[5] == "| `x` | 2.00x | 2.00x | 2.00x | 4.67 |"
    assert "Machine: M, 2 threads, " in text


def test_decode_speedups_leave_the_prefill_out() -> None:
    def record(method: str, seconds: float, prefill: float | None) -> Record:
        return Record(method, "a", "c", 0, 10, seconds, 10 / seconds, 1.0, prefill_seconds=prefill)

    # Both spend 4 s on the prompt; after it, x decodes its 10 tokens in 1 s to none's 4 s.
    records = [record("none", 8.0, 4.0), record("x", 5.0, 4.0), record("peer", 6.0, None)]
    assert speedups(records)[("c", "x")] == [8.0 / 5.0]
    assert speedups(records, decode_only=True)[("c", "x")] == [4.0]
    assert ("c", "peer") not in speedups(records, decode_only=True)  # no prefill measured


class AcceptEverything(Verifier):
    """Deliberately wrong: keeps every draft whatever the target says."""

    name = "accept-everything"
    supports_trees = False
    lossless = False

    def verify(self, tree, target_logits, sampling, rng) -> Verdict:
        path = list(range(tree.num_nodes))
        tokens = tree.tokens.tolist() + [int(target_logits[-1].argmax())]
        return Verdict(path, tokens, tree.num_nodes, True)


def test_an_exactness_mismatch_is_reported_first_and_fails_the_run(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setitem(VERIFIERS, AcceptEverything.name, AcceptEverything)
    methods = tmp_path / "methods.toml"
    methods.write_text(
        '[[method]]\nname = "broken"\ndrafter = "prompt-lookup"\nverifier = "accept-everything"\n'
    )
    code, out = bench(tmp_path, "--methods", str(methods))
    assert code == 1
    records = read_records(out / "results.jsonl")
    assert any(r.exact is False for r in records if r.method == "broken")
    report = (out / "report.md").read_text()
    assert report.index("EXACTNESS MISMATCHES") < report.index("## Overall")
    assert "**NO**" in report


def stop_at_run(monkeypatch, number: int, stop: Callable[[], None]) -> Callable:
    """Make the benchmark call `stop` as its `number`-th run starts; returns the real runner."""
    measure = runner_module.Runner._measure
    calls = {"n": 0}

    def measure_or_stop(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == number:
            stop()
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(runner_module.Runner, "_measure", measure_or_stop)
    return measure


def ctrl_c() -> None:
    raise KeyboardInterrupt


def test_interrupted_run_keeps_its_records_and_resumes(tmp_path: Path, monkeypatch) -> None:
    measure = stop_at_run(monkeypatch, 4, ctrl_c)
    code, out = bench(tmp_path, "--methods", "prompt-lookup")
    assert code == 130
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the bench's handler is undone
    kept = read_records(out / "results.jsonl")
    assert len(kept) == 3
    # The report covers the one prompt both methods finished, and says the run is partial.
    partial = (out / "report.md").read_text()
    assert "Partial run: 1 of 4 prompt runs" in partial
    # Without --resume the directory is not silently overwritten.
    assert bench(tmp_path, "--methods", "prompt-lookup")[0] == 2
    monkeypatch.setattr(runner_module.Runner, "_measure", measure)
    code, out = bench(tmp_path, "--methods", "prompt-lookup", "--resume")
    assert code == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    written = [Record(**json.loads(line)) for line in lines]
    # The prompt cut off after its baseline ran again whole: its baseline has two records, and
    # the later one counts.
    assert len(written) == 9 and [r.key for r in written[:3]] == [r.key for r in kept]
    assert written[3].key == kept[2].key
    records = read_records(out / "results.jsonl")
    assert len(records) == 8 and len({r.key for r in records}) == 8
    assert records[1].key == kept[1].key and records[2] == written[3] != written[2]
    assert all(r.exact for r in records if r.method != "none")
    final = (out / "report.md").read_text()
    assert "Partial run" not in final and "--resume" not in final.split("Command:")[1]


def test_a_run_resumes_only_with_its_own_settings(lookup_run: Path, tmp_path: Path, capsys) -> None:
    out = copy_of(lookup_run, tmp_path)
    results = (out / "results.jsonl").read_text()
    changed = tmp_path / "changed.toml"
    changed.write_text(
        '[[method]]\nname = "prompt-lookup"\ndrafter = "prompt-lookup"\ncontroller = "fixed"\n'
    )
    for extra, named in [
        (["--resume", "--temperature", "1"], "--temperature 0.0"),
        (["--resume", "--max-new-tokens", "16"], "--max-new-tokens 12"),
        (["--report-only", "--seed", "3"], "--seed 0"),
        (["--resume", "--methods", str(changed)], "method prompt-lookup is defined differently"),
    ]:
        capsys.readouterr()
        assert bench(tmp_path, "--methods", "prompt-lookup", *extra)[0] == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and named in error
    # Refused before anything ran: the records are as they were.
    assert (out / "results.jsonl").read_text() == results
    # Another method may join the run; the settings file then knows both.
    assert bench(tmp_path, "--methods", "prompt-lookup,prompt-lookup-k10", "--resume")[0] == 0
    stored = json.loads((out / "settings.json").read_text())
    assert set(stored["methods"]) == {"prompt-lookup", "prompt-lookup-k10"}
    assert stored["settings"]["max_new_tokens"] == 12


def test_run_settings_constrain_only_what_was_measured(tmp_path: Path, capsys) -> None:
    def command(**changes):
        args = argparse.Namespace(
            suite="quick",
            model=TINY,
            draft_model="d",
            backend="torch",
            dtype="bfloat16",
            temperature=0.0,
            max_new_tokens=12,
            seed=0,
            draft_quantize="int8",
            draft_vocabulary=None,
        )
        for key, value in changes.items():
            setattr(args, key, value)
        return run_settings.of_command(args, parse_methods("prompt-lookup"))

    # A run begun before settings were kept: a warning, no refusal.
    run_settings.check(tmp_path, command(), {"prompt-lookup"})
    assert "unchecked" in capsys.readouterr().err
    run_settings.write(tmp_path, command())
    # No method with a draft model: the draft settings are not the run's, and do not bind it.
    assert json.loads((tmp_path / "settings.json").read_text())["settings"]["draft_model"] is None
    run_settings.check(tmp_path, command(draft_model="other"), {"prompt-lookup"})
    # Nothing measured yet: nothing to compare.
    run_settings.check(tmp_path, command(temperature=1.0), set())
    with pytest.raises(SpecDecodeError, match="--temperature 0.0"):
        run_settings.check(tmp_path, command(temperature=1.0), {"prompt-lookup"})
    # A file that is not a settings file says what to do.
    (tmp_path / "settings.json").write_text("[1, 2]")
    with pytest.raises(SpecDecodeError, match="move it away"):
        run_settings.check(tmp_path, command(), {"prompt-lookup"})


def test_a_run_resumes_only_with_the_llama_cpp_kernels_it_ran(tmp_path: Path) -> None:
    """The kernels each llamacpp backend ran, and whether llama.cpp's tiled kernel was on, are
    known once the models load; records are not resumed under others. Settings files from before
    they were kept come from versions that ran `llamacpp` on the narrow kernels, without the
    tiled kernel."""
    args = argparse.Namespace(suite="quick", model=TINY, backend="llamacpp")
    command = run_settings.of_command(args, parse_methods("prompt-lookup"))
    assert command["settings"]["llamacpp_kernels"] is None  # before loading: not compared
    legacy = json.loads(json.dumps(command))
    for key in run_settings.LOADED_SETTINGS:
        del legacy["settings"][key]
    (tmp_path / "settings.json").write_text(json.dumps(legacy))
    run_settings.check(tmp_path, command, {"prompt-lookup"})

    def loaded(kernels: dict, tiled: str) -> dict:
        settings = json.loads(json.dumps(command))
        settings["settings"].update(llamacpp_kernels=kernels, llamacpp_tiled_kernel=tiled)
        return settings

    with pytest.raises(
        SpecDecodeError, match="kernels llamacpp=narrow, this command has llamacpp=matched"
    ):
        run_settings.check(tmp_path, loaded({"llamacpp": "matched"}, "off"), {"prompt-lookup"})
    with pytest.raises(SpecDecodeError, match="tiled kernel .* off, this command has on"):
        run_settings.check(tmp_path, loaded({"llamacpp": "narrow"}, "on"), {"prompt-lookup"})
    # compared where both say: another backend may join the run
    both = loaded({"llamacpp": "narrow", "llamacpp-wide": "wide"}, "off")
    run_settings.check(tmp_path, both, {"prompt-lookup"})
    assert run_settings.of_loaded({}, llamacpp_ar=False) == dict.fromkeys(
        run_settings.LOADED_SETTINGS
    )
    # only the backends of measured records bind: a kernel change elsewhere passes
    run_settings.check(tmp_path, loaded({"llamacpp": "narrow"}, "off"), set())
    run_settings.write(tmp_path, loaded({"llamacpp-wide": "wide"}, "off"))
    stored = json.loads((tmp_path / "settings.json").read_text())["settings"]
    # what a command did not load stays on record
    assert stored["llamacpp_kernels"] == {"llamacpp": "narrow", "llamacpp-wide": "wide"}


def test_a_stop_request_ends_the_run_as_ctrl_c_does(tmp_path: Path) -> None:
    """`kill` (SIGTERM) on a bench in its own process, as a user or a job scheduler sends it."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "specdecode", "bench", *FAST]
    command += ["--methods", "prompt-lookup", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        results = out / "results.jsonl"
        while not (results.is_file() and results.read_text().count("\n") >= 3):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no record in 10 minutes"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    records = read_records(results)
    assert 3 <= len(records) < 2 * len(load_suite("quick"))  # stopped early
    assert "Partial run" in (out / "report.md").read_text()


def test_report_only_rewrites_the_report_without_running(
    lookup_run: Path, tmp_path: Path, monkeypatch
) -> None:
    out = copy_of(lookup_run, tmp_path)
    written = (out / "report.md").read_text()
    (out / "report.md").unlink()

    def must_not_run(*args, **kwargs):
        raise AssertionError("--report-only ran a method")

    monkeypatch.setattr(runner_module.Runner, "run", must_not_run)
    assert bench(tmp_path, "--methods", "prompt-lookup", "--report-only")[0] == 0
    rewritten = (out / "report.md").read_text()
    # Same tables; the machine line may differ only in what the machine reports.
    assert rewritten.split("Machine:")[0] == written.split("Machine:")[0]
    assert "--report-only" not in rewritten
    # Fewer methods than were run: the report keeps to the methods asked for.
    assert bench(tmp_path, "--methods", "prompt-lookup-k10", "--report-only")[0] == 1

    # The AMX tiles round differently from the row-wise kernels: records of one are not resumed
    # on the other, and a report of a run on the tiles says so and gives the switch in its command.
    stored = json.loads((out / "settings.json").read_text())
    ran = stored["settings"]["torch_products"]
    assert ran in ("library", "row-wise kernels")
    on_tiles = json.loads(json.dumps(stored))
    on_tiles["settings"]["torch_products"] = run_settings.AMX_TILES
    with pytest.raises(SpecDecodeError, match=f"SPECDECODE_TILES.* {ran}, this command has AMX"):
        run_settings.check(out, on_tiles, {"prompt-lookup"})
    run_settings.check(out, on_tiles, set())  # nothing measured: nothing to keep apart
    (out / "settings.json").write_text(json.dumps(on_tiles))
    assert bench(tmp_path, "--methods", "prompt-lookup", "--report-only")[0] == 0
    report = (out / "report.md").read_text()
    assert "products on AMX tiles" in report
    assert "Command: `SPECDECODE_TILES=1 specdecode bench" in report


def test_a_run_resumes_only_on_the_machine_it_ran_on(
    lookup_run: Path, tmp_path: Path, capsys
) -> None:
    out = copy_of(lookup_run, tmp_path)
    results = out / "results.jsonl"
    moved = [{**json.loads(line), "machine": "Other CPU, 8 threads"} for line in results.open()]
    results.write_text("".join(json.dumps(raw) + "\n" for raw in moved))
    # The report names the machine the records ran on, not the one writing it.
    assert bench(tmp_path, "--methods", "prompt-lookup", "--report-only")[0] == 0
    assert "Machine: Other CPU, 8 threads, " in (out / "report.md").read_text()
    capsys.readouterr()
    assert bench(tmp_path, "--methods", "prompt-lookup", "--resume")[0] == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Other CPU, 8 threads" in error and "new --out" in error


def test_methods_files_sets_and_sweeps(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(
        '[[method]]\nname = "pld"\ndrafter = "prompt-lookup"\ncontroller = "fixed"\n'
        "num_draft_tokens = [2, 4]\n[method.drafter_options]\nmax_ngram = 4\n\n"
        '[[method]]\nname = "transformers"\npeer = "hf-ar"\n'
    )
    methods = parse_methods(str(path))
    assert [m.name for m in methods] == ["pld-k2", "pld-k4", "transformers"]
    assert methods[1].spec.num_draft_tokens == 4 and methods[1].sweep == "pld"
    assert methods[0].spec.drafter_options == {"max_ngram": 4}
    assert [m.name for m in parse_methods("all-lossless")] == SETS["all-lossless"]
    without_draft = parse_methods("all-lossless", has_draft_model=False)
    assert all(not m.needs_draft_model for m in without_draft) and without_draft
    assert BUILTIN["hf-assisted"].needs_draft_model


BAD = [
    (["--methods", "warp-drive"], "unknown method"),
    (["--suite", "nonexistent"], "unknown suite"),
    (["--methods", "draft-model"], "need --draft-model"),
    (["--repeats", "0"], "--repeats"),
    (["--categories", "poetry"], "no prompts of categories"),
    (["--report-only"], "--report-only needs --out"),
    (["--report-only", "--out", "/nonexistent/run"], "no records at /nonexistent/run"),
]


@pytest.mark.parametrize("argv, fragment", BAD)
def test_bad_input_is_one_line(capsys, argv: list[str], fragment: str) -> None:
    code = main(["bench", "--model", TINY, *argv])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and err.count("error: ") == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("[[method]\nname = 1", "not valid TOML"),
        ('[[method]]\nname = "x"\ndrafter = "telepathy"\n', "unknown drafter"),
        ('[[method]]\nname = "x"\ndrafter = "draft-model"\ntree = "bushy"\n', "unknown tree"),
        ('[[method]]\nname = "x"\ndrafter = "prompt-lookup"\nwarp = 9\n', "unknown keys"),
        ('[[method]]\nname = "x"\npeer = "vllm"\n', "unknown peer"),
        ('[[method]]\nname = "x"\ndrafter = "none"\nbackend = "tpu"\n', "unknown backend"),
        ('[[method]]\nname = "x"\npeer = "hf-ar"\nbackend = "torch"\n', "a peer takes no"),
        ('title = "no methods"\n', "no [[method]]"),
    ],
)
def test_malformed_methods_file(tmp_path: Path, capsys, content: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    code = main(["bench", "--model", TINY, "--methods", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err


def test_unwritable_output_directory(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(["bench", *FAST, "--out", str(blocker / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write to" in err


def test_missing_peer_package_stops_or_is_skipped(tmp_path: Path, capsys, monkeypatch) -> None:
    from specdecode.bench import peers

    monkeypatch.setattr(peers, "missing_package", lambda kind: "pip install something")
    code = main(["bench", *FAST, "--methods", "prompt-lookup,hf-ar"])
    err = capsys.readouterr().err
    assert code == 2 and "--skip-missing" in err and "pip install something" in err
    code = main(
        [
            "bench",
            *FAST,
            "--categories",
            "rag",
            "--methods",
            "prompt-lookup,hf-ar",
            "--skip-missing",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0 and "warning: skipping hf-ar" in captured.err
    assert "`hf-ar`" not in captured.out and "`prompt-lookup`" in captured.out


FAKE_LLAMA_SERVER = """#!{python}
# Stands in for llama-server: answers /health, and /completion with the prompt's last 3 tokens,
# then an end-of-sequence token; logs its arguments and each request body.
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
log = open({log!r}, "a")
log.write(json.dumps({{"argv": sys.argv[1:]}}) + "\\n"); log.flush()
port = int(sys.argv[sys.argv.index("--port") + 1])
class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data)))
        self.end_headers(); self.wfile.write(data)
    def do_GET(self):
        self.reply({{"status": "ok"}})
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        log.write(json.dumps({{"request": request}}) + "\\n"); log.flush()
        tokens = request["prompt"][-3:] + [{eos}]
        timings = {{"prompt_ms": 250.0, "predicted_n": 9, "draft_n": 6, "draft_n_accepted": 4}}
        self.reply({{"tokens": tokens, "timings": timings}})
HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def test_llama_server_peer_speaks_the_servers_protocol(tmp_path: Path, monkeypatch) -> None:
    """The llamacpp-server peers against a stand-in server: the binary gets the model, the port
    and the n-gram flags; each prompt goes as token ids, greedy, without prompt caching; the
    reply is cut at EOS, its prompt time is the prefill, and its draft counts give its forwards
    (8 tokens after the first, 4 of them accepted drafts: 4 forwards)."""
    from specdecode.bench.peers import LlamaServerPeer
    from specdecode.config import SamplingParams

    log = tmp_path / "server.log"
    eos = 151645
    fake = tmp_path / "llama-server"
    fake.write_text(FAKE_LLAMA_SERVER.format(python=sys.executable, log=str(log), eos=eos))
    fake.chmod(0o755)
    monkeypatch.setenv("SPECDECODE_LLAMA_SERVER", str(fake))
    peer = LlamaServerPeer("llamacpp-server-ngram", TINY, threads=2)
    try:
        out = peer.generate(
            "llamacpp-server-ngram", [5, 6, 7, 8], SamplingParams(max_new_tokens=9), {eos}
        )
    finally:
        peer.close()
    assert out.token_ids == [6, 7, 8] and out.prefill_seconds == 0.25
    assert (out.target_forwards, out.emitted_tokens) == (4, 8)
    assert out.seconds > 0
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    argv, request = entries[0]["argv"], entries[1]["request"]
    assert argv[argv.index("--spec-type") + 1] == "ngram-simple"
    assert argv[argv.index("-m") + 1].endswith(".gguf") and argv[argv.index("-t") + 1] == "2"
    assert request["prompt"] == [5, 6, 7, 8] and request["n_predict"] == 9
    assert request["temperature"] == 0.0 and request["cache_prompt"] is False


def test_a_llama_server_that_exits_gives_its_last_log_line(tmp_path: Path, monkeypatch) -> None:
    from specdecode.bench.peers import LlamaServerPeer
    from specdecode.errors import SpecDecodeError

    fake = tmp_path / "llama-server"
    fake.write_text(
        "#!/bin/sh\necho 'loading model' >&2\necho 'error: unknown architecture' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("SPECDECODE_LLAMA_SERVER", str(fake))
    with pytest.raises(SpecDecodeError) as error:
        LlamaServerPeer("llamacpp-server", TINY, threads=2)
    expected = "llama-server for llamacpp-server exited: error: unknown architecture"
    assert str(error.value) == expected


def test_a_missing_llama_server_stops_the_run_with_the_build_command(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("SPECDECODE_LLAMA_SERVER", str(tmp_path / "absent"))
    code = main(["bench", *FAST, "--methods", "prompt-lookup,llamacpp-server-ngram"])
    err = capsys.readouterr().err
    assert code == 2 and "build_llama_server.sh" in err and "--skip-missing" in err


def test_peak_memory_sees_an_allocation_that_is_gone_by_the_end() -> None:
    from specdecode.bench.memory import PeakMemory, resident_mb

    with PeakMemory() as peak:
        block = torch.ones(256 * 2**20, dtype=torch.uint8)  # 256 MB, touched
        block += 1
        during = resident_mb()
        time.sleep(0.05)  # several sampling intervals
        del block
    assert peak.mb >= during - 1


def test_llamacpp_peer_runs_beside_ours(tmp_path: Path) -> None:
    """llama-cpp-python (the `llamacpp` extra, which the test extra installs) decodes the same
    GGUF file on the same prompts, reported beside our methods."""
    pytest.importorskip("llama_cpp", reason="install the extra: pip install -e '.[llamacpp]'")
    code, out = bench(tmp_path, "--methods", "prompt-lookup,llamacpp-ar")
    assert code == 0
    records = read_records(out / "results.jsonl")
    peers = [r for r in records if r.method == "llamacpp-ar"]
    assert len(peers) == 4
    for r in peers:
        assert r.new_tokens > 0 and r.tokens_per_second > 0 and r.token_ids
        assert r.exact is None  # another implementation's numerics: not held to token identity
    assert "`llamacpp-ar`" in (out / "report.md").read_text()


def test_llamacpp_peer_samples_the_same_distribution_as_ours() -> None:
    """llama-cpp-python's generate() narrows sampling with min_p 0.05 unless told otherwise; the
    peer must sample the plain temperature / top-k / top-p distribution our methods sample."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="install the extra: pip install -e '.[llamacpp]'"
    )
    calls: list[dict] = []

    class RecordingLlama:
        def reset(self) -> None:
            pass

        def generate(self, tokens, **options):
            calls.append(options)
            yield from (11, 12)

    peer = LlamaCppPeer.__new__(LlamaCppPeer)  # no model: only the call's options are checked
    peer.llm = RecordingLlama()
    sampling = SamplingParams(temperature=1.0, max_new_tokens=2)
    output = peer.generate("llamacpp-ar", [1, 2, 3], sampling, frozenset())
    assert output.token_ids == [11, 12]
    (options,) = calls
    accepted = inspect.signature(llama_cpp.Llama.generate).parameters
    assert set(options) <= set(accepted)  # the names the real generate() takes
    assert options["min_p"] == 0.0 and options["temp"] == 1.0
    assert options["top_k"] == 0 and options["top_p"] == 1.0


def test_a_method_on_another_backend_is_checked_against_that_backends_baseline(
    tmp_path: Path,
) -> None:
    """Token identity holds within a backend (two backends' numerics differ): a llamacpp method in
    a torch run gets its own plain baseline, `none-llamacpp`, and is checked against it."""
    methods = tmp_path / "m.toml"
    methods.write_text(
        '[[method]]\nname = "pld-torch"\ndrafter = "prompt-lookup"\n\n'
        '[[method]]\nname = "pld-llamacpp"\ndrafter = "prompt-lookup"\nbackend = "llamacpp"\n'
    )
    code, out = bench(tmp_path, "--methods", str(methods))
    assert code == 0
    records = read_records(out / "results.jsonl")
    by_method: dict[str, list[Record]] = {}
    for r in records:
        by_method.setdefault(r.method, []).append(r)
    assert sorted(by_method) == ["none", "none-llamacpp", "pld-llamacpp", "pld-torch"]
    assert {r.backend for r in by_method["none-llamacpp"]} == {"llamacpp"}
    assert {r.backend for r in by_method["pld-torch"]} == {"torch"}
    for r in by_method["pld-llamacpp"]:
        twin = next(b for b in by_method["none-llamacpp"] if b.prompt_id == r.prompt_id)
        assert r.exact is True and r.token_ids == twin.token_ids
    assert "Backends: llamacpp, torch" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).parent.parent / "benchmarks" / "methods").glob("*.toml")),
    ids=lambda p: p.name,
)
def test_committed_methods_files_parse_and_name_known_parts(path: Path) -> None:
    from specdecode.drafters import DRAFTERS
    from specdecode.trees import CHAIN, TREE_SHAPES

    methods = parse_methods(str(path))
    assert methods
    for method in methods:
        if method.peer is not None:
            assert method.peer in PEERS
            continue
        assert method.spec is not None
        assert method.backend is None or method.backend in BACKEND_NAMES
        assert method.spec.drafter in DRAFTERS
        assert method.spec.tree == CHAIN or method.spec.tree in TREE_SHAPES
        assert method.spec.verifier is None or method.spec.verifier in VERIFIERS


def test_llama_server_runs_without_the_switch_specdecode_set(monkeypatch) -> None:
    """llama-server, a peer, runs as users run it: without the tiled-kernel switch that specdecode
    set for its own kernels, but with one the user set."""
    from specdecode.backends import llamacpp

    monkeypatch.setenv("GGML_CPU_TILED_MM", "0")
    monkeypatch.setattr(llamacpp, "_tiled_switch_set_here", True)
    assert "GGML_CPU_TILED_MM" not in llamacpp.user_environment()
    monkeypatch.setattr(llamacpp, "_tiled_switch_set_here", False)
    assert llamacpp.user_environment()["GGML_CPU_TILED_MM"] == "0"


def test_acceptance_by_depth_sums_the_counts_of_every_prompt() -> None:
    """Each depth's rate is accepted over drafted summed over prompts (not a mean of the
    prompts' rates), and depths drafted too rarely are left off."""

    def record(method: str, drafted: list[int], accepted: list[int]) -> Record:
        return Record(
            method,
            "p",
            "c",
            0,
            8,
            1.0,
            8.0,
            100.0,
            drafted_at_depth=drafted,
            accepted_at_depth=accepted,
        )

    records = [
        record("a", [10, 10, 2], [5, 2]),
        record("a", [30, 20, 5], [25, 10, 1]),
        record("none", [], []),
    ]
    assert acceptance_by_depth(records) == {"a": [30 / 40, 12 / 30]}
    assert acceptance_by_depth(records, min_drafted=1) == {"a": [30 / 40, 12 / 30, 1 / 7]}
