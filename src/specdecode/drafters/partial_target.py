"""Self-speculation: the target drafts with a part of itself, on its own KV cache.

The drafting model is the target run through a `LayerPlan` (some attention and MLP sublayers
skipped, or only the first layers and the shared output layer): no second model, no extra
weights. Drafts are decoded one by one (or a tree grown level by level) with partial forwards of
the target; each writes the kept layers' cache rows of its token after the committed ones, where
it sees the committed tokens' full-model keys and values, as the papers' drafts do. After drafting
the cache is cut back to the committed tokens, so the verification forward rewrites those rows in
every layer and nothing a draft computed reaches the target's output (greedy output is plain
decoding's, token for token).

A subclass says which plan drafts (`plan`), may learn from each verification (`update`), and may
run the plan's states through more than the target's own output layer (`draft_logits`, with
`drop_drafts` forgetting what that kept).
Drafts stop early after a token the partial model doubts (`ConfidenceStop`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from specdecode.backends.base import Backend, LayerPlan
from specdecode.config import SamplingParams
from specdecode.drafters.base import NO_TARGET_OUTPUT, Drafter, DrafterResources, TargetOutput
from specdecode.drafters.draft_model import TreeExpander, draft_chain
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget, DraftTree
from specdecode.trees import TreeShape
from specdecode.verify.base import Verdict


def require_layer_plans(target: Backend, name: str) -> int:
    """The target's layer count, or a one-line refusal where its backend cannot skip layers."""
    if not target.supports_layer_plans or target.num_layers is None:
        raise SpecDecodeError(
            f"the {name!r} drafter runs part of the target, which the {type(target).__name__} "
            "cannot: use --backend torch"
        )
    return target.num_layers


class PartialTargetDrafter(Drafter):
    samples_drafts = True
    supports_trees = True
    runs_part_of_target = True

    def __init__(
        self,
        target: Backend,
        min_confidence: float = 0.0,
        adapt_confidence: bool = False,
        tree: TreeShape | None = None,
    ) -> None:
        self.num_layers = require_layer_plans(target, self.name)
        self.target = target
        self.stop = ConfidenceStop(min_confidence, adapt_confidence, self.name)
        self.tree = tree
        self._asked = 0  # the depth the last chain could have reached
        self.sampling = SamplingParams()
        self.rng: torch.Generator | None = None

    @classmethod
    def create(cls, options: dict[str, Any], resources: DrafterResources) -> Drafter:
        return cls(resources.target, **options, tree=resources.tree)

    @abstractmethod
    def plan(self, context: Sequence[int]) -> LayerPlan:
        """The part of the target that drafts this step."""

    def start(self, prompt: Sequence[int], target: TargetOutput) -> None:
        """A new request begins (`target`: its prompt's prefill), for a subclass's own state."""

    def begin(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        rng: torch.Generator | None,
        target: TargetOutput = NO_TARGET_OUTPUT,
    ) -> None:
        self.sampling = sampling
        self.rng = rng
        self.start(prompt, target)

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        target = self.target
        committed = target.num_cached  # the context but its last token, the tree's root
        if committed != len(context) - 1:
            raise RuntimeError("the target's cache is not in step with the context")
        room = target.max_context - len(context) - 1
        depth = min(budget.max_depth, room)
        if depth <= 0 or (self.tree is not None and not budget.max_nodes):
            return DraftTree.empty()
        plan = self.plan(context)

        def forward(
            ids: torch.Tensor,  # [T]
            positions: torch.Tensor | None = None,  # [T]
            mask: torch.Tensor | None = None,  # [T, S]
        ) -> torch.Tensor:  # [T, V]
            return self.draft_logits(plan, ids, positions, mask)

        try:
            logits = forward(torch.tensor([context[-1]], dtype=torch.long))[-1]  # [V]
            if self.tree is not None:
                budget = Budget(depth, budget.max_width, min(budget.max_nodes or 0, room))
                expander = TreeExpander(forward, len(context))
                return self.tree.grow(logits, expander, budget, self.sampling, self.rng)
            self._asked = depth
            return draft_chain(
                logits,
                lambda token: forward(torch.tensor([token], dtype=torch.long))[-1],
                depth,
                self.sampling,
                self.rng,
                self.stop.threshold,
            )
        finally:
            self.drop_drafts(committed)

    def draft_logits(
        self,
        plan: LayerPlan,
        ids: torch.Tensor,  # [T]
        positions: torch.Tensor | None,  # [T]; None: after the cached tokens
        mask: torch.Tensor | None,  # [T, S]; None: causal
    ) -> torch.Tensor:  # [T, V]
        """The drafting model's next-token logits at `ids`, appended after the cached tokens."""
        return self.target.forward_partial(ids, plan, positions, mask)

    def drop_drafts(self, committed: int) -> None:
        """Forget what drafting appended after the `committed` tokens."""
        self.target.truncate(committed)

    def update(self, verdict: Verdict, target: TargetOutput = NO_TARGET_OUTPUT) -> None:
        if verdict.num_draft_nodes and self.tree is None:
            self.stop.observe(verdict, reached_full_depth=verdict.num_draft_nodes >= self._asked)


class ConfidenceStop:
    """A chain stops after a token to which the partial model gives less than `threshold`: a
    doubtful draft is likely rejected, and drafting the next one costs a partial forward.

    With `adapt`, the threshold follows Draft & Verify's rule (Zhang et al. 2024, section 3.3):
    after each verification the acceptance rate (accepted / drafted) is smoothed, half the last
    step's and half the history's; the threshold then moves a tenth of the way to itself raised by
    0.01 while the smoothed rate is under 0.9 (drafts too bold), else lowered by 0.01 (too timid),
    except after a draft that reached its full length, which did not stop for doubt."""

    TARGET_ACCEPTANCE = 0.9
    STEP = 0.01

    def __init__(self, threshold: float, adapt: bool, drafter: str) -> None:
        if not 0.0 <= threshold < 1.0:
            raise SpecDecodeError(
                f"the {drafter!r} drafter's min_confidence must be in [0, 1), got {threshold}"
            )
        self.threshold = threshold
        self.adapt = adapt
        self.acceptance: float | None = None

    def observe(self, verdict: Verdict, reached_full_depth: bool) -> None:
        if not self.adapt:
            return
        rate = verdict.num_accepted / verdict.num_draft_nodes
        self.acceptance = rate if self.acceptance is None else 0.5 * self.acceptance + 0.5 * rate
        if self.acceptance < self.TARGET_ACCEPTANCE:
            aim = self.threshold + self.STEP
        elif reached_full_depth:
            return
        else:
            aim = self.threshold - self.STEP
        self.threshold = min(0.99, max(0.0, 0.9 * self.threshold + 0.1 * aim))
