"""The command line: usage, JSON output and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_llama

from specdecode.cli import build_parser, main

SMALL = "qwen2.5-coder-0.5b-instruct"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    # Progress bars of a first-time model install may come before; the error is one last line.
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert fragment in errors[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["generate", ""], "prompt is empty"),
        (["generate", "   "], "prompt is empty"),
        (["generate", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
        (["generate", "hi", "--max-new-tokens", "-5"], "max-new-tokens"),
        (["generate", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--top-p", "0"], "top-p"),
        (["generate", "hi", "--top-p", "1.5"], "top-p"),
        (["generate", "hi", "--model", "no-such-model"], "no-such-model"),
        (["generate", "hi", "--drafter", "draft-model"], "--draft-model"),
        (["bench", "--methods", "warp-drive"], "unknown method"),
        # Each of these fails before a model loads.
        (["generate", "hi", "--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
        (["generate", "hi", "--threads", "0"], "argument --threads: must be at least 1"),
        (["bench", "--threads", "0"], "argument --threads: must be at least 1"),
        (["generate", "hi", "--stop", ""], "stop string (--stop) must not be empty"),
        (["generate", "hi", "--dtype", "int4"], "argument --dtype: invalid choice: 'int4'"),
        (["generate", "hi", "--verifier", "nope"], "argument --verifier: invalid choice"),
        (["generate", "hi", "--controller", "nope"], "argument --controller: invalid choice"),
        (["generate", "hi", "--drafter", "nope"], "argument --drafter: invalid choice"),
        (["generate", "hi", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["certify", "--temperature", "0"], "give --temperature above 0"),
        (["analyze"], "give --draft-model"),
        (
            ["generate", "hi", "--backend", "llamacpp-narrow"],
            "use --backend llamacpp --kernels narrow",
        ),
        (["bench", "--backend", "llamacpp-stock"], "use --backend llamacpp --kernels stock"),
        (["generate", "hi", "--backend", "vulkan"], "invalid choice: 'vulkan'"),
        (["generate", "hi", "--kernels", "narrow"], "go with backend llamacpp"),
        (["bench", "--backend", "hf", "--kernels", "wide"], "go with backend llamacpp"),
        (["generate", "hi", "--min-ngram", "4", "--max-ngram", "2"], "--min-ngram <= --max-ngram"),
        (["generate", "hi", "--min-ngram", "0"], "1 <= --min-ngram"),
        (["generate", "hi", "--draft-min-confidence", "0.4"], "the drafter is prompt-lookup"),
        (
            ["generate", "hi", "--draft-model", SMALL, "--draft-min-confidence", "1.5"],
            "--draft-min-confidence must be in [0, 1)",
        ),
        (["generate", "hi", "--draft-model", SMALL, "--max-ngram", "8"], "drafter is draft-model"),
        (
            ["generate", "hi", "--drafter", "layer-skip", "--backend", "llamacpp"],
            "only --backend torch can",
        ),
        (["generate", "hi", "--drafter", "clasp", "--backend", "hf"], "only --backend torch can"),
        (
            ["generate", "hi", "--drafter", "kangaroo", "--backend", "llamacpp"],
            "only --backend torch can",
        ),
        (
            ["train-drafter", "--model", SMALL, "--kind", "kangaroo", "--exit-layer", "0"],
            "exit layer must be at least 1",
        ),
        (["generate", "hi", "--drafter", "layer-skip", "--skip-ratio", "1.5"], "between 0 and 1"),
        (["generate", "hi", "--skip-ratio", "0.3"], "option of layer-skip and clasp"),
        (["generate", "hi", "--drafter", "clasp", "--exit-layer", "4"], "option of early-exit"),
        (
            ["generate", "hi", "--drafter", "layer-skip", "--skip-file", "/no/such/skip.json"],
            "cannot read the skip set",
        ),
        (["tune-skip", "--model", SMALL, "--out", "x.json", "--tries", "0"], "--tries >= 1"),
    ],
)
def test_bad_input_gives_one_line_error(capsys, argv, fragment) -> None:
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)


def test_an_exit_layer_beyond_the_model_is_refused_before_decoding(capsys) -> None:
    code, _, err = run(
        capsys,
        "generate",
        "hi",
        "--model",
        "smollm2-135m-instruct",
        "--drafter",
        "early-exit",
        "--exit-layer",
        "99",
    )
    assert_one_line_error(code, err, "the exit layer must be between 1 and 30")


def test_prompt_longer_than_the_context(capsys) -> None:
    code, _, err = run(capsys, "generate", "word " * 9000, "--model", SMALL, "--no-chat")
    assert_one_line_error(code, err, "context")


def test_draft_model_with_another_tokenizer_is_refused(capsys) -> None:
    code, _, err = run(capsys, "generate", "hi", "--model", SMALL, "--draft-model", "gemma-3-270m")
    assert_one_line_error(code, err, "tokenizer")


def test_truncated_gguf_file_is_refused(capsys, tmp_path) -> None:
    from specdecode.models import resolve_gguf

    source = resolve_gguf("smollm2-135m-instruct")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(source.read_bytes()[:5_000_000])
    code, _, err = run(capsys, "generate", "hi", "--model", str(broken))
    assert_one_line_error(code, err, "broken.gguf")


def test_json_output(capsys) -> None:
    code, out, _ = run(
        capsys,
        "generate",
        "Say hello.",
        "--model",
        SMALL,
        "--format",
        "json",
        "--max-new-tokens",
        "8",
    )
    assert code == 0
    result = json.loads(out)
    assert set(result) >= {"text", "token_ids", "stats"}
    stats = result["stats"]
    for key in (
        "new_tokens",
        "seconds",
        "tokens_per_second",
        "target_forwards",
        "mean_accepted_tokens",
        "acceptance_histogram",
    ):
        assert key in stats
    assert 0 < stats["new_tokens"] == len(result["token_ids"]) <= 8
    assert sum(stats["acceptance_histogram"]) == stats["target_forwards"]
    assert stats["controller"] == "cost-aware"  # the default for a chain


def test_models_list(capsys) -> None:
    code, out, _ = run(capsys, "models")
    assert code == 0
    for name in (SMALL, "qwen2.5-coder-1.5b-instruct", "gemma-3-270m", "smollm2-135m-instruct"):
        assert name in out


def test_no_traceback_from_a_real_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "specdecode", "generate", "hi", "--temperature", "-2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_device_cuda_without_cuda_is_one_line(capsys) -> None:
    code, _, err = run(capsys, "generate", "hi", "--device", "cuda")
    assert_one_line_error(code, err, "--device cuda: ")
    assert "use --device cpu" in err


def test_llamacpp_backend_refuses_a_hugging_face_directory(capsys, tmp_path) -> None:
    model = tmp_path / "some-model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    code, _, err = run(capsys, "generate", "hi", "--model", str(model), "--backend", "llamacpp")
    assert_one_line_error(code, err, "the llamacpp backend needs a GGUF file")


def test_help_speaks_of_the_project_only() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    texts = [parser.format_help(), *(p.format_help() for p in subparsers.choices.values())]
    for text in texts:
        assert "issue" not in text.lower(), text


def _spec(*argv: str):
    from specdecode.cli import _spec_from_args

    return _spec_from_args(build_parser().parse_args(["generate", "hi", *argv]))


def test_generate_exposes_the_drafters_options() -> None:
    assert _spec().drafter_options == {}
    assert _spec("--min-ngram", "2", "--max-ngram", "8").drafter_options == {
        "min_ngram": 2,
        "max_ngram": 8,
    }
    # Below the length at which a match counts as strong, the longest match counts as strong.
    assert _spec("--max-ngram", "2").drafter_options == {"max_ngram": 2, "strong_ngram": 2}
    adaptive = _spec("--draft-model", SMALL, "--draft-min-confidence", "0.4")
    assert adaptive.drafter == "draft-model"
    assert adaptive.drafter_options == {"min_confidence": 0.4}


def test_default_controller_is_cost_aware_for_chains_and_heuristic_for_trees() -> None:
    assert _spec().controller == "cost-aware"
    assert _spec("--draft-model", SMALL).controller == "cost-aware"
    assert _spec("--draft-model", SMALL, "--tree", "static").controller == "heuristic"
    assert _spec("--controller", "fixed").controller == "fixed"
    certify = build_parser().parse_args(["certify"])
    assert certify.controller == "heuristic"  # a certificate needs drafts to test


def tiny_hf_model(directory: Path) -> Path:
    save_tiny_llama(directory)
    return directory


def fake_hub_cache(root: Path, model_id: str) -> Path:
    """The local Hugging Face cache's layout for `model_id`: models--ORG--NAME/refs/main naming a
    snapshot folder; returns the (empty) snapshot folder."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_hugging_face_id_resolves_from_the_local_cache(capsys, tmp_path, monkeypatch) -> None:
    from specdecode.models import resolve_model

    hub = tmp_path / "hub"
    snapshot = tiny_hf_model(fake_hub_cache(hub, "tiny-org/Tiny-Llama"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_model("tiny-org/Tiny-Llama") == str(snapshot)
    argv = ["--no-chat", "--max-new-tokens", "6", "--format", "json"]
    code, out, err = run(
        capsys, "generate", "one two one two", "--model", "tiny-org/Tiny-Llama", *argv
    )
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) == 6


def test_hugging_face_id_not_in_the_cache_says_what_to_pass(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "other-org/Other")  # another model is there
    code, _, err = run(capsys, "generate", "hi", "--model", "Qwen/Qwen2.5-0.5B-Instruct")
    assert_one_line_error(code, err, "'Qwen/Qwen2.5-0.5B-Instruct' is not in the local Hugging")
    for what in ("does not download", "a .gguf file", "registry name from `specdecode models`"):
        assert what in err


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="PyTorch finds no CUDA device on this machine"
)
def test_generation_runs_on_cuda(capsys, tmp_path) -> None:
    """--device cuda: the same greedy tokens with and without speculation, on the GPU."""
    model = tiny_hf_model(tmp_path)
    argv = ["--model", str(model), "--device", "cuda", "--no-chat", "--format", "json"]
    prompt = "one two three one two three one two three one two"
    outputs = []
    for drafter in ("none", "prompt-lookup"):
        code, out, err = run(capsys, "generate", prompt, *argv, "--drafter", drafter)
        assert code == 0, err
        outputs.append(json.loads(out)["token_ids"])
    assert outputs[0] == outputs[1] and len(outputs[0]) > 0
