"""CLaSp: the layers a self-speculative draft skips, re-chosen from what verification computed.

Chen et al., "CLaSp: In-Context Layer Skip for Self-Speculative Decoding" (ACL 2025). After a
verification, the target's hidden states at every layer for the last accepted token say what
the full model computes there; a dynamic programme picks which `skip_ratio` of the middle layers
(whole layers, attention and MLP together) a draft can leave out with its state staying closest
to them:

    g(i, j) = the draft's state after the first i layers with j of them skipped,
    g(i, j) = whichever of layer i applied to g(i - 1, j) (kept) and g(i - 1, j - 1) (skipped)
              is more cosine-similar to the full model's state after layer i,

and the skip set is read back from g(L, M). Only one state is kept per cell, so it is a greedy
approximation of the best set, as in the paper. All the states of one layer go through it in
one call, as rows of one token at its own position that each see the cached context and
themselves, so a search costs about one forward of M + 1 rows. It re-runs every `replan_every`
verifications (the paper notes that neighbouring steps' sets differ little); the first and last
layers are always kept.

Drafts stop after a token the partial model gives less than `min_confidence` (the paper's draft
exiting threshold). See `partial_target.py` for how drafts share the target's KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from specdecode.backends.base import Backend, LayerPlan
from specdecode.drafters.base import NO_TARGET_OUTPUT, TargetOutput
from specdecode.drafters.partial_target import PartialTargetDrafter
from specdecode.errors import SpecDecodeError
from specdecode.trees import TreeShape
from specdecode.verify.base import Verdict


class ClaspDrafter(PartialTargetDrafter):
    name = "clasp"

    def __init__(
        self,
        target: Backend,
        skip_ratio: float = 0.45,
        replan_every: int = 4,
        min_confidence: float = 0.6,
        adapt_confidence: bool = False,
        tree: TreeShape | None = None,
    ) -> None:
        super().__init__(target, min_confidence, adapt_confidence, tree)
        layers = self.num_layers
        if layers < 3:
            raise SpecDecodeError(f"a model of {layers} layers has no middle layers to skip")
        if not 0.0 < skip_ratio < 1.0 or replan_every < 1:
            raise SpecDecodeError(
                f"clasp needs 0 < skip_ratio < 1 and replan_every >= 1, got {skip_ratio}, "
                f"{replan_every}"
            )
        self.count = max(1, round((layers - 2) * skip_ratio))
        self.replan_every = replan_every
        # Every layer's input and the last layer's output: the full model's state after each.
        self.hidden_layers = tuple(range(layers + 1))
        # Until the first search: every other middle layer, SWIFT's starting point.
        middle = list(range(1, layers - 1))
        odd_first = [x for x in middle if x % 2 == 1] + [x for x in middle if x % 2 == 0]
        self.skipped = frozenset(odd_first[: self.count])
        self.verifications = 0
        self._states: torch.Tensor | None = None  # [L + 1, H] to search from at the next step

    def start(self, prompt: Sequence[int], target: TargetOutput) -> None:
        self.verifications = 0
        # The first search: from the prefill's states of the last cached prompt token.
        self._states = (
            target.hidden[-1] if target.hidden is not None and len(target.hidden) else None
        )

    def plan(self, context: Sequence[int]) -> LayerPlan:
        if self._states is not None:
            self.skipped = self.search(self._states, self.target.num_cached - 1)
            self._states = None
        return LayerPlan(skip_attention=self.skipped, skip_mlp=self.skipped)

    def update(self, verdict: Verdict, target: TargetOutput = NO_TARGET_OUTPUT) -> None:
        super().update(verdict, target)
        self.verifications += 1
        if target.hidden is not None and self.verifications % self.replan_every == 0:
            # The last accepted token's row: its node's, or the root's when none was accepted.
            row = verdict.path[-1] + 1 if verdict.path else 0
            self._states = target.hidden[row]  # [L + 1, H]

    def search(self, states: torch.Tensor, position: int) -> frozenset[int]:
        """The dynamic programme (see the module docstring) for the token cached at `position`
        (the last accepted one), from the full model's states `states` [L + 1, H]."""
        layers, count = self.num_layers, self.count
        target = self.target
        # cells[j]: (state, skipped layers) after the layers so far with j of them skipped
        cells: dict[int, tuple[torch.Tensor, tuple[int, ...]]] = {0: (states[0], ())}
        for layer in range(layers):
            alive = sorted(cells)
            inputs = torch.stack([cells[j][0] for j in alive])  # [R, H]
            rows = inputs.shape[0]
            # Each row is the token at its position: it sees the cached slots before it (not its
            # own, the last cached one) and itself.
            mask = torch.cat(
                [torch.zeros(rows, 1, dtype=torch.bool), torch.eye(rows, dtype=torch.bool)], dim=1
            )
            positions = torch.full((rows,), position, dtype=torch.long)
            kept = target.forward_layer(layer, inputs, positions, mask)  # [R, H]
            full = states[layer + 1].float()
            skippable = 0 < layer < layers - 1
            remaining = max(0, layers - 2 - layer)  # middle layers after this one
            candidates: dict[int, list[tuple[torch.Tensor, tuple[int, ...]]]] = {}
            for index, j in enumerate(alive):
                candidates.setdefault(j, []).append((kept[index], cells[j][1]))
                if skippable and j < count:
                    candidates.setdefault(j + 1, []).append((cells[j][0], (*cells[j][1], layer)))
            # A cell that cannot reach `count` skipped layers by the end is dropped.
            cells = {
                j: _closest(options, full)
                for j, options in candidates.items()
                if count - j <= remaining
            }
        if count not in cells:
            return self.skipped
        return frozenset(cells[count][1])


def _closest(
    options: list[tuple[torch.Tensor, tuple[int, ...]]], full: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The option whose state is most cosine-similar to the full model's `full` [H]."""
    similarity = [float(F.cosine_similarity(state.float(), full, dim=0)) for state, _ in options]
    return options[max(range(len(options)), key=similarity.__getitem__)]
