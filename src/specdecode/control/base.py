"""The speculation-length controller contract: how much to draft next, given the past steps."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from specdecode.tree import Budget, DraftTree
from specdecode.verify.base import Verdict


@dataclass(frozen=True)
class StepTimings:
    """Wall-clock seconds one step spent drafting and verifying (target forward + verifier)."""

    drafting: float
    verifying: float


class Controller(ABC):
    name: ClassVar[str]
    #: Whether the controller's model of a step assumes a chain (one node per drafted token).
    chains_only: ClassVar[bool] = False
    #: Whether the controller plans from the target's measured forward costs (`use_costs`).
    uses_costs: ClassVar[bool] = False

    @classmethod
    def create(cls, initial: int, maximum: int, options: dict[str, Any]) -> Controller:
        return cls(initial, maximum, **options)

    @abstractmethod
    def budget(self) -> Budget:
        """The draft budget for the next step."""

    def shorten(self, tree: DraftTree) -> DraftTree:
        """The part of the drafter's proposal to verify: all of it, or for a controller that
        sizes drafts from their forecasts (`DraftTree.confidence`), a prefix of a chain, chosen
        without looking at this step's random draws (drafters learn from the verdict of the
        prefix)."""
        return tree

    def observe(self, verdict: Verdict, timings: StepTimings | None = None) -> None:
        """Learn from the last step."""

    def reset(self) -> None:
        """Start a new sequence."""

    def use_costs(self, verify_seconds: dict[int, float]) -> None:
        """Seconds of a target forward that verifies k drafts, measured on this machine."""
