"""Training text for draft heads that any fresh machine has, offline.

The built-in recipe (`Recipe`) mixes two sources:
- self-distillation, most of it: instruction conversations made from templates (`prompts.py`)
  answered by the target itself, so that the head learns the target's own answers (Medusa-2 and
  EAGLE do the same with their chat data), generated many at a time (`batched.py`);
- a little of the Python standard library of the running interpreter: module source (code) and
  the modules' docstrings joined as prose.

Never the benchmark's prompts: modules the bench suites quote are left out, and any text that
shares a 64-character window with a bench prompt is dropped (`bench_windows`; a test checks the
result). `--data FILES` replaces the recipe with the user's own text files.

A training sequence is token ids with a loss mask: whether the prediction after each token is
trained (all of a text; only the answer of a prompt-answer pair).
"""

from __future__ import annotations

import ast
import functools
import random
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from specdecode.bench.suites import SUITES, load_suite
from specdecode.errors import SpecDecodeError
from specdecode.train.prompts import Conversation, Material, conversations, gather_material

#: Window length of the bench-overlap check, in characters.
OVERLAP_WINDOW = 64
#: Standard-library folders that are tests, data or tools rather than library code.
_SKIPPED_PARTS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip"}


@dataclass(frozen=True)
class Recipe:
    """How much of each source the built-in data has (in tokens and prompts)."""

    stdlib_tokens: int = 20_000
    distill_prompts: int = 640  # one-turn instructions the target answers
    follow_ups: int = 160  # second turns on some of those answers
    distill_max_tokens: int = 256
    distill_max_prompt: int = 1024  # longer prompts are left out
    distill_batch: int = 48  # answers generated together (see `batched.py`)
    sequence_length: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.stdlib_tokens, self.distill_prompts, self.follow_ups) < 0:
            raise SpecDecodeError("the recipe's token and prompt counts must be >= 0")
        if self.sequence_length < 16 or self.distill_max_tokens < 1:
            raise SpecDecodeError("training sequences need at least 16 tokens")
        if self.distill_max_prompt < 16 or self.distill_batch < 1:
            raise SpecDecodeError("prompts need at least 16 tokens, the batch at least 1")


@dataclass
class TrainingSequence:
    """One training sequence."""

    tokens: list[int]
    loss_mask: list[bool]  # [t]: train the prediction after token t
    source: str  # where it came from, for the summary


# ---- the benchmark, kept out ------------------------------------------------------------------


def bench_texts() -> list[str]:
    """Every message of every built-in bench suite."""
    texts = []
    for suite in SUITES:
        for prompt in load_suite(suite):
            texts.extend(message["content"] for message in prompt.chat())
    return texts


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@functools.cache
def bench_windows() -> frozenset[str]:
    """The 64-character windows (whitespace collapsed) of the bench prompts, every 16 characters:
    a text containing any 80 consecutive characters of a prompt contains one of them (made once
    per process)."""
    windows = set()
    for text in bench_texts():
        flat = _normalise(text)
        for start in range(0, max(1, len(flat) - OVERLAP_WINDOW + 1), 16):
            windows.add(flat[start : start + OVERLAP_WINDOW])
    return frozenset(windows)


def overlaps_bench(text: str, windows: frozenset[str]) -> bool:
    flat = _normalise(text)
    return any(
        flat[i : i + OVERLAP_WINDOW] in windows for i in range(len(flat) - OVERLAP_WINDOW + 1)
    )


def bench_modules() -> set[str]:
    """Standard-library files the bench suites quote (their prompts' origins), by relative path."""
    quoted = set()
    for suite in SUITES:
        for prompt in load_suite(suite):
            quoted.update(re.findall(r"Lib/([\w/]+\.py)", prompt.origin))
    return quoted


# ---- the standard library ---------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library modules, sorted, less tests, tools and bench sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    quoted = bench_modules()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIPPED_PARTS & set(relative.parts) or str(relative) in quoted:
            continue
        files.append(path)
    if not files:
        raise SpecDecodeError(f"no standard-library sources under {root}: pass --data FILES")
    return files


def docstrings(source: str) -> str:
    """The docstrings of a module, its classes and functions, as paragraphs."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text and len(text) > 40:
                found.append(text)
    return "\n\n".join(found)


def stdlib_texts(seed: int) -> Iterator[tuple[str, str]]:
    """(source, text) pairs, alternating a module's docstrings (prose) and its code, in a seeded
    order of the modules."""
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        prose = docstrings(source)
        if prose:
            yield f"stdlib prose {path.name}", prose
        yield f"stdlib code {path.name}", source


# ---- self-distillation prompts ----------------------------------------------------------------


@functools.cache
def stdlib_material() -> Material:
    """What the prompt templates draw on: the standard library less the bench's modules (parsed
    once per process)."""
    sources = []
    for path in stdlib_files():
        try:
            sources.append((path.stem, path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    return gather_material(sources)


def distill_conversations(count: int, seed: int) -> list[Conversation]:
    """`count` one-turn instruction conversations (`prompts.conversations`), none of which shares
    a window with a bench prompt."""
    windows = bench_windows()
    return conversations(
        count, seed, stdlib_material(), lambda text: not overlaps_bench(text, windows)
    )


# ---- the user's own files ---------------------------------------------------------------------


def read_user_files(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(source, text) of each `--data` file, refused in one line if unreadable, empty or binary."""
    texts = []
    for name in paths:
        path = Path(name).expanduser()
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise SpecDecodeError(f"cannot read --data file {name}: {exc.strerror}") from None
        if b"\0" in raw[:4096]:
            raise SpecDecodeError(f"--data file {name} looks binary: give text files")
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            raise SpecDecodeError(f"--data file {name} is empty")
        texts.append((f"file {path.name}", text))
    if not texts:
        raise SpecDecodeError("--data needs at least one file")
    return texts


def text_sequences(
    texts: Iterator[tuple[str, str]] | Sequence[tuple[str, str]],
    encode,
    max_tokens: int,
    sequence_length: int,
) -> list[TrainingSequence]:
    """Cut texts into sequences of at most `sequence_length` tokens, up to `max_tokens` in all
    (every prediction trained)."""
    windows = bench_windows()
    sequences: list[TrainingSequence] = []
    total = 0
    for source, text in texts:
        if total >= max_tokens:
            break
        if overlaps_bench(text, windows):
            continue
        ids = encode(text)
        for start in range(0, len(ids), sequence_length):
            piece = ids[start : start + sequence_length][: max_tokens - total]
            if len(piece) < 16:
                break
            sequences.append(TrainingSequence(piece, [True] * len(piece), source))
            total += len(piece)
    return sequences
