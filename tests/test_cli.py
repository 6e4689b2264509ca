"""The command line: usage, JSON output and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from specdecode.cli import main

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
    ],
)
def test_bad_input_gives_one_line_error(capsys, argv, fragment) -> None:
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)


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
