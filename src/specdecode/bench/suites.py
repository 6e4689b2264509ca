"""Benchmark suites: prompts grouped in Spec-Bench's categories, shipped with the package.

A suite is a JSONL file of prompts, each `{id, category, prompt | messages, origin}`: `prompt` is a
single user turn, `messages` a whole conversation whose last user turn the model answers. Built-in
suites live in `bench/data/` (assembled by `benchmarks/build_suites.py`, which records every
prompt's origin); any path to such a file works as a suite too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from specdecode.errors import SpecDecodeError

DATA = Path(__file__).parent / "data"
SUITES = {
    "spec-bench": "six categories after Spec-Bench, 20 prompts each",
    "quick": "two prompts per category, for smoke tests and CI",
    "core": "code editing (6 prompts) and code completion (3 prompts)",
    "sessions": "8 sessions of 5 requests that repeat one another's structure (edits, "
    "extraction, tool calls, revisions), for drafters that learn across requests",
}


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    prompt: str | None = None  # one user turn
    messages: tuple[dict, ...] | None = None  # a conversation ending with a user turn
    origin: str = ""
    #: Requests of one session run in the suite's order and share what drafters learn across
    #: requests ("": the prompt stands alone).
    session: str = ""

    def chat(self) -> list[dict]:
        """The prompt as chat messages."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt}]


def suite_path(name_or_path: str) -> Path:
    if name_or_path in SUITES:
        return DATA / f"{name_or_path}.jsonl"
    path = Path(name_or_path)
    if path.suffix == ".jsonl" and path.is_file():
        return path
    raise SpecDecodeError(
        f"unknown suite {name_or_path!r}; choose one of {', '.join(SUITES)} or give a .jsonl file"
    )


def load_suite(name_or_path: str, categories: Sequence[str] | None = None) -> list[Prompt]:
    path = suite_path(name_or_path)
    prompts: list[Prompt] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            messages = raw.get("messages")
            prompt = Prompt(
                id=str(raw["id"]),
                category=str(raw["category"]),
                prompt=raw.get("prompt"),
                messages=tuple(messages) if messages is not None else None,
                origin=str(raw.get("origin", "")),
                session=str(raw.get("session", "")),
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise SpecDecodeError(
                f"{path}:{number}: not a prompt record ({exc}); each line needs id, category and "
                "prompt or messages"
            ) from None
        if (prompt.prompt is None) == (prompt.messages is None):
            raise SpecDecodeError(f"{path}:{number}: give exactly one of prompt and messages")
        prompts.append(prompt)
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise SpecDecodeError(f"{path}: prompt ids must be unique")
    if categories:
        unknown = set(categories) - {p.category for p in prompts}
        if unknown:
            raise SpecDecodeError(
                f"no prompts of categories {sorted(unknown)} in {path.name}; it has: "
                + ", ".join(sorted({p.category for p in prompts}))
            )
        prompts = [p for p in prompts if p.category in categories]
    if not prompts:
        raise SpecDecodeError(f"{path} holds no prompts")
    return prompts
