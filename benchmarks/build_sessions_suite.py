"""Assemble the `sessions` suite: multi-request sessions whose requests share structure.

Agents and pipelines send a model many requests that repeat one another's structure: the same
instruction over many inputs, a tool-call format, a function revised again and again. A drafter
that learns across requests (suffix decoding) is measured on such sessions: the bench runs a
session's requests in order in one process and lets drafters keep what they learned within it
(never across sessions, never across repeats). Built from the project's own spec-bench material
(CPython standard-library functions and documentation, PSF licence; HumanEval problems, MIT
licence; questions written for specdecode), so it needs nothing but the repository:

- edit-many: one edit instruction over five functions, as a refactoring tool applies it;
- extraction: one JSON extraction template over five modules' documentation;
- tool-calls: an agent's tool list and five questions, each answered by one JSON tool call;
- self-refine: one function written, then revised four times (validation, an example, no
  imports, a rename), the function's stub in every request.

Two sessions of five requests per category (40 prompts), each session in one category.

    python benchmarks/build_sessions_suite.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "src" / "specdecode" / "bench" / "data"
REQUESTS = 5

EDIT_INSTRUCTIONS = [
    "Add type hints to this function and rename its local variables to descriptive names. "
    "Reply with the complete code.",
    "Rewrite this function's docstring in Google style (Args, Returns, Raises sections). Reply "
    "with the complete code.",
]
EXTRACTION = (
    "Read the documentation below and reply with a JSON object only, with exactly these keys: "
    '"module" (its name), "purpose" (one sentence), "functions" (the names of the functions or '
    'classes it mentions, at most five) and "keywords" (three words).\n\n'
    'Documentation of <<NAME>>:\n"""\n<<DOC>>\n"""'
)
TOOLS = (
    "You are an agent that answers by calling exactly one tool. Tools:\n"
    '- calculator: {"expression": string}, evaluates arithmetic\n'
    '- search: {"query": string, "max_results": integer}, searches the web\n'
    '- python: {"code": string}, runs Python and returns its output\n'
    "Reply with one JSON object and nothing else, in this form:\n"
    '{"tool": "<name>", "arguments": {...}, "reason": "<why this tool, one sentence>"}\n\n'
    "Question: <<QUESTION>>"
)
REVISIONS = [
    "Complete the following Python function. Reply with the whole function.",
    "Complete the following Python function, then make it raise ValueError on invalid input. "
    "Reply with the whole function.",
    "Complete the following Python function and add one more doctest example to its docstring, "
    "for the smallest valid input. Reply with the whole function.",
    "Complete the following Python function without importing anything. Reply with the whole "
    "function.",
    "Complete the following Python function, giving every local variable a descriptive name. "
    "Reply with the whole function.",
]


def code_block(text: str) -> str:
    match = re.search(r"```python\n(.*?)```", text, re.S)
    if match is None:
        raise SystemExit(f"no code block in: {text[:80]!r}")
    return match.group(1)


def build() -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "spec-bench.jsonl").read_text().splitlines()]
    by_category: dict[str, list[dict]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
    prompts: list[dict] = []

    def add(category: str, session: str, index: int, prompt: str, origin: str) -> None:
        prompts.append(
            {
                "id": f"{session}-{index + 1}",
                "category": category,
                "session": session,
                "prompt": prompt,
                "origin": origin,
            }
        )

    edits = by_category["code-editing"]
    for s, instruction in enumerate(EDIT_INSTRUCTIONS):
        session = f"edit-many-{'ab'[s]}"
        for i, row in enumerate(edits[s * REQUESTS : (s + 1) * REQUESTS]):
            code = code_block(row["prompt"])
            add("edit-many", session, i, f"{instruction}\n\n```python\n{code}```", row["origin"])

    docs = by_category["summarization"]
    for s in range(2):
        session = f"extraction-{'ab'[s]}"
        for i, row in enumerate(docs[s * REQUESTS : (s + 1) * REQUESTS]):
            doc = row["prompt"].split('"""')[1].strip()
            name = row["id"].removeprefix("summarize-")
            prompt = EXTRACTION.replace("<<NAME>>", name).replace("<<DOC>>", doc)
            add("extraction", session, i, prompt, row["origin"] + "; template for specdecode")

    questions = [row["prompt"].split("\n\n")[0] for row in by_category["math-reasoning"]]
    questions += [row["messages"][0]["content"] for row in by_category["multi-turn"]]
    for s in range(2):
        session = f"tool-calls-{'ab'[s]}"
        picked = questions[s * REQUESTS : (s + 1) * REQUESTS] if s == 0 else questions[-REQUESTS:]
        for i, question in enumerate(picked):
            prompt = TOOLS.replace("<<QUESTION>>", question)
            add("tool-calls", session, i, prompt, "written for specdecode")

    completions = by_category["code-completion"]
    for s in range(2):
        session = f"self-refine-{'ab'[s]}"
        row = completions[s]
        stub = code_block(row["prompt"])
        for i, instruction in enumerate(REVISIONS):
            prompt = f"{instruction}\n\n```python\n{stub}```"
            add("self-refine", session, i, prompt, row["origin"] + "; revisions for specdecode")
    return prompts


def main() -> None:
    prompts = build()
    path = DATA / "sessions.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    print(f"wrote {len(prompts)} prompts to {path}")


if __name__ == "__main__":
    main()
