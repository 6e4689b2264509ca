"""Replay sam's copies over recorded greedy outputs under two rules for a tie between the match's
first and its most recent earlier occurrence (no model runs; see NOTES.md beside this file).

Below `min_match` the fallback here drafts nothing (so every short match's copy drafts); the
heuristic controller sizes the drafts as in the engine. Tokens per forward per category, summed
over the prompts (total tokens / total forwards).

    cd benchmarks/results/training-free-peers-spec-bench-30-1.5b-llamacpp
    python sam-occurrence-replay/replay.py .            # the 30 prompts, outputs of f184cf9
    python sam-occurrence-replay/replay.py sam-28d3f31  # 20 of them, outputs of the Xeon run
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/

from replay_prompt_lookup import accepted_length, recorded_runs  # noqa: E402

from specdecode.config import SamplingParams  # noqa: E402
from specdecode.control.heuristic import HeuristicController  # noqa: E402
from specdecode.drafters.base import Drafter  # noqa: E402
from specdecode.drafters.prompt_lookup import PromptLookupDrafter  # noqa: E402
from specdecode.drafters.sam import FIRST_OCCURRENCE, RECENT_OCCURRENCE, SamDrafter  # noqa: E402
from specdecode.tree import Budget, DraftTree  # noqa: E402
from specdecode.verify.base import Verdict  # noqa: E402

#: Matches shorter than this break a tie toward the most recent occurrence in the second rule.
SHORT_MATCH = 3


class NoDraft(Drafter):
    name = "no-draft"
    proposes_freely = True

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        return DraftTree.empty()


class RecentOnShortTies(SamDrafter):
    """sam, but the occurrences are scored separately for short and long matches, and a tie
    goes to the most recent occurrence after a short match (as prompt lookup copies)."""

    def _begin_request(self) -> None:
        super()._begin_request()
        self.agreed_by_class = {True: [0, 0], False: [0, 0]}
        self.short_class = False

    def _score_copies(self) -> None:
        before = list(self.copy_agreed)
        super()._score_copies()
        for occurrence in (FIRST_OCCURRENCE, RECENT_OCCURRENCE):
            gained = self.copy_agreed[occurrence] - before[occurrence]
            self.agreed_by_class[self.short_class][occurrence] += gained

    def _copy(self, wanted: int, min_length: int) -> DraftTree:
        automaton = self.automaton
        short = automaton.match_length < SHORT_MATCH
        state, _ = automaton.shorter_with_more_to_copy(wanted, min_length)
        first = automaton.continuation(state, wanted)
        recent = automaton.recent_continuation(wanted)
        self.copies, self.short_class = (len(automaton.text), first, recent), short
        first_agreed, recent_agreed = self.agreed_by_class[short]
        use_recent = recent_agreed > first_agreed or (recent_agreed == first_agreed and short)
        return DraftTree.chain(recent if use_recent and recent else first)


def forwards(drafter: Drafter, prompt: list[int], output: list[int]) -> int:
    controller = HeuristicController(6, 16)
    drafter.begin(prompt, SamplingParams(), None)
    context, done, steps = list(prompt), 0, 0
    while done < len(output):
        future = output[done:]
        draft = drafter.propose(context, controller.budget()).tokens.tolist()[: len(future) - 1]
        accepted = accepted_length(draft, future)
        verdict = Verdict(
            list(range(accepted)), [0] * (accepted + 1), len(draft), accepted == len(draft)
        )
        controller.observe(verdict)
        drafter.update(verdict)
        emitted = min(accepted + 1, len(future))
        context += future[:emitted]
        done, steps = done + emitted, steps + 1
    return steps


def main() -> None:
    folder = Path(sys.argv[1])
    runs = recorded_runs(
        str(folder / "results.jsonl"),
        str(folder / "suite.jsonl"),
        "qwen2.5-coder-1.5b-instruct",
        "none",
    )
    policies: dict[str, Callable[[], Drafter]] = {
        "prompt-lookup": PromptLookupDrafter,
        "sam's copies (tie: first occurrence)": lambda: SamDrafter(fallback=NoDraft()),
        "sam's copies (tie after a short match: most recent)": lambda: RecentOnShortTies(
            fallback=NoDraft()
        ),
    }
    totals: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for run in runs:
        for name, make in policies.items():
            total = totals[name][run.category]
            total[0] += len(run.output)
            total[1] += forwards(make(), run.prompt, run.output)
    categories = list(dict.fromkeys(run.category for run in runs))
    print("| policy | " + " | ".join(categories) + " |")
    print("|---" * (len(categories) + 1) + "|")
    for name, by_category in totals.items():
        cells = [f"{by_category[c][0] / by_category[c][1]:.2f}" for c in categories]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
