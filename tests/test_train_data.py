"""The training data of draft heads: offline, and disjoint from the benchmark's prompts."""

from __future__ import annotations

import random
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
    distill_conversations,
    overlaps_bench,
    read_user_files,
    stdlib_files,
    stdlib_texts,
    text_sequences,
)
from specdecode.train.prompts import FOLLOW_UPS, follow_up


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
    on the tokenizer, the text does not), its self-distillation prompts and the follow-up
    questions (the follow-ups' other turns are the model's answers)."""
    recipe = Recipe()
    sequences = text_sequences(
        stdlib_texts(recipe.seed),
        lambda text: [ord(c) for c in text],
        recipe.stdlib_tokens * 4,  # about four characters per token
        4096,
    )
    texts = ["".join(map(chr, s.tokens)) for s in sequences]
    for conversation in distill_conversations(recipe.distill_prompts, recipe.seed):
        texts += [message["content"] for message in conversation]
    texts += FOLLOW_UPS
    return "\n".join(_flat(t) for t in texts)


def test_the_default_recipe_shares_no_text_with_the_bench_prompts(recipe_text: str) -> None:
    assert len(recipe_text) > 200_000
    leaked = [probe for probe in _bench_probes() if probe in recipe_text]
    assert not leaked, leaked[:3]


def _word_grams(text: str, n: int = 5) -> set[str]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _conversation_grams() -> set[str]:
    """Five-word phrases of the bench's conversations and word problems, where the topic is the
    prompt (elsewhere, code and documentation, the 64-character check is the one that matters)."""
    grams: set[str] = set()
    for suite in SUITES:
        for prompt in load_suite(suite):
            if prompt.category in ("multi-turn", "math-reasoning"):
                for message in prompt.chat():
                    grams |= _word_grams(message["content"])
    return grams


def test_the_recipes_instructions_do_not_ask_the_benchs_questions() -> None:
    """Not even in other words: the word lists were cleared of the bench's topics (why the sky
    is blue, lists and tuples, ...); no five-word phrase of a bench conversation or word problem
    is in a recipe instruction or follow-up question."""
    recipe = Recipe()
    ours: set[str] = set()
    for conversation in distill_conversations(recipe.distill_prompts, recipe.seed):
        ours |= _word_grams(conversation[0]["content"])
    for question in FOLLOW_UPS:
        ours |= _word_grams(question)
    assert not ours & _conversation_grams(), sorted(ours & _conversation_grams())[:5]


def test_the_phrase_check_finds_a_bench_question_in_other_words() -> None:
    """The negative control: a template that asked chat-01's question is caught."""
    reworded = "What are the differences between a list and a tuple in Python?"
    assert _word_grams(reworded) & _conversation_grams()


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


def test_distill_conversations_are_seeded_and_varied() -> None:
    first = distill_conversations(60, seed=0)
    assert first == distill_conversations(60, seed=0)
    assert first != distill_conversations(60, seed=1)
    texts = [c[0]["content"] for c in first]
    assert len(set(texts)) == 60 and all(len(c) == 1 and c[0]["role"] == "user" for c in first)
    # every template family is drawn: code in fences, documentation in quotes, arithmetic, ...
    assert sum("```python" in t for t in texts) >= 6
    assert sum('"""' in t and "```" not in t for t in texts) >= 6
    assert sum(t.startswith("Translate into") for t in texts) >= 2
    assert sum(any(ch.isdigit() for ch in t) and "```" not in t for t in texts) >= 4


def test_a_follow_up_holds_the_answers_first_paragraph_and_a_question() -> None:
    conversation = [{"role": "user", "content": "Explain tides."}]
    answer = "The moon pulls the sea.\n\nMore detail here."
    turns = follow_up(conversation, answer, random.Random(0))
    assert turns[:2] == [*conversation, {"role": "assistant", "content": "The moon pulls the sea."}]
    assert turns[2]["role"] == "user" and turns[2]["content"] in FOLLOW_UPS


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
