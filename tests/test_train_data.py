"""The training data of draft heads: offline, and disjoint from the benchmark's prompts."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import pytest

from specdecode.bench.suites import SUITES, load_suite
from specdecode.errors import SpecDecodeError
from specdecode.train.data import (
    Recipe,
    bench_modules,
    bench_windows,
    distill_prompts,
    overlaps_bench,
    read_user_files,
    stdlib_files,
    stdlib_texts,
    text_sequences,
)


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _bench_probes() -> list[str]:
    """From every bench message, three 40-character pieces (start, middle, end): a check that
    does not share the recipe's own windows."""
    probes = []
    for suite in SUITES:
        for prompt in load_suite(suite):
            for message in prompt.chat():
                flat = _flat(message["content"])
                if len(flat) >= 60:
                    middle = len(flat) // 2 - 20
                    probes += [flat[:40], flat[middle : middle + 40], flat[-40:]]
    return probes


@pytest.fixture(scope="module")
def recipe_text() -> str:
    """The default recipe's text: its standard-library sequences (as characters: the cut depends
    on the tokenizer, the text does not) and its self-distillation prompts."""
    recipe = Recipe()
    sequences = text_sequences(
        stdlib_texts(recipe.seed),
        lambda text: [ord(c) for c in text],
        recipe.stdlib_tokens * 4,  # about four characters per token
        4096,
    )
    texts = ["".join(map(chr, s.tokens)) for s in sequences]
    texts += distill_prompts(recipe.distill_prompts, recipe.seed)
    return "\n".join(_flat(t) for t in texts)


def test_the_default_recipe_shares_no_text_with_the_bench_prompts(recipe_text: str) -> None:
    assert len(recipe_text) > 300_000
    leaked = [probe for probe in _bench_probes() if probe in recipe_text]
    assert not leaked, leaked[:3]


def test_the_check_finds_a_bench_prompt_hidden_in_a_text() -> None:
    """The negative control: a text quoting a bench prompt is caught."""
    windows = bench_windows()
    prompt = load_suite("spec-bench")[0].chat()[0]["content"]
    assert overlaps_bench(f"Some preamble.\n{prompt}\nAnd more.", windows)
    assert not overlaps_bench("A sentence no benchmark prompt contains, about tides. " * 3, windows)


def test_modules_the_bench_quotes_are_left_out_of_the_standard_library_data() -> None:
    quoted = bench_modules()
    assert "textwrap.py" in quoted and "statistics.py" in quoted
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = {path.relative_to(root).as_posix() for path in stdlib_files()}
    assert not quoted & relative, quoted & relative
    assert len(relative) > 300


def test_distill_prompts_are_seeded_and_varied() -> None:
    first = distill_prompts(30, seed=0)
    assert first == distill_prompts(30, seed=0)
    assert first != distill_prompts(30, seed=1)
    assert len(set(first)) >= 28
    kinds = {"Explain", "Summarize", "Translate", "Write", "Give", "What", "Solve", "A ", "Ana"}
    assert sum(any(p.startswith(k) for k in kinds) for p in first) == 30


def test_user_files_are_checked_in_one_line(tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    good = tmp_path / "notes.txt"
    good.write_text("Some notes of mine.\n" * 10)
    with pytest.raises(SpecDecodeError, match="is empty"):
        read_user_files([str(empty)])
    with pytest.raises(SpecDecodeError, match="looks binary"):
        read_user_files([str(binary)])
    with pytest.raises(SpecDecodeError, match="cannot read --data file"):
        read_user_files([str(tmp_path / "missing.txt")])
    assert read_user_files([str(good)])[0][0] == "file notes.txt"
