"""A fixed draft length: always draft `k` tokens."""

from __future__ import annotations

from specdecode.control.base import Controller
from specdecode.tree import Budget


class FixedController(Controller):
    name = "fixed"

    def __init__(self, initial: int, maximum: int) -> None:
        self.length = initial

    def budget(self) -> Budget:
        return Budget.chain(self.length)
