"""Early-exit self-speculation: the target's first layers and its own output layer draft.

LayerSkip (Elhoushi et al., ACL 2024) and Kangaroo (Liu et al., NeurIPS 2024): the draft is the
first `exit_layer` decoder layers, then the final norm and the shared output layer. The drafts'
cache rows below the exit are the ones the full model computes for the same tokens, and the
verification forward rewrites them with the rest (see `partial_target.py`). LayerSkip trains the
model so that early exits predict well; on a model not trained for it, an exit far below the top
drafts little that is accepted, which the measurements in docs/methods.md show. Drafts stop after
a token the partial model gives less than `min_confidence` (Kangaroo's second early exit).
"""

from __future__ import annotations

from collections.abc import Sequence

from specdecode.backends.base import Backend, LayerPlan
from specdecode.drafters.partial_target import PartialTargetDrafter
from specdecode.trees import TreeShape


class EarlyExitDrafter(PartialTargetDrafter):
    name = "early-exit"

    def __init__(
        self,
        target: Backend,
        exit_layer: int | None = None,
        min_confidence: float = 0.6,
        adapt_confidence: bool = False,
        tree: TreeShape | None = None,
    ) -> None:
        super().__init__(target, min_confidence, adapt_confidence, tree)
        # By default the upper quarter of the layers is left out.
        self.exit_plan = LayerPlan(exit_layer=exit_layer or max(1, (3 * self.num_layers) // 4))
        self.exit_plan.check(self.num_layers)

    def plan(self, context: Sequence[int]) -> LayerPlan:
        return self.exit_plan
