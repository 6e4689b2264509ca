"""Grow the draft after a full acceptance, shrink it after a rejection.

The schedule of Hugging Face transformers' assisted generation ("heuristic"): +2 tokens when every
draft was accepted (for a tree: a path down to a leaf), -1 otherwise, kept within [1, maximum].
Steps that drafted nothing (the drafter found no proposal) leave the length alone.
"""

from __future__ import annotations

from specdecode.control.base import Controller, StepTimings
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget
from specdecode.verify.base import Verdict


class HeuristicController(Controller):
    name = "heuristic"

    def __init__(self, initial: int, maximum: int, grow: int = 2, shrink: int = 1) -> None:
        if grow < 0 or shrink < 0:
            raise SpecDecodeError("the heuristic controller's grow and shrink steps must be >= 0")
        self.initial = initial
        self.maximum = maximum
        self.grow = grow
        self.shrink = shrink
        self.length = initial

    def budget(self) -> Budget:
        return Budget.chain(self.length)

    def observe(self, verdict: Verdict, timings: StepTimings | None = None) -> None:
        if verdict.num_draft_nodes == 0:
            return
        if verdict.bonus:  # no rejection: the chain, or a tree path, was accepted to its end
            self.length = min(self.maximum, self.length + self.grow)
        else:
            self.length = max(1, self.length - self.shrink)

    def reset(self) -> None:
        self.length = self.initial
