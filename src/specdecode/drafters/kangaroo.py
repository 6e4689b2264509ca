"""`kangaroo`: early exit through a trained adapter (Liu et al., NeurIPS 2024; see
`specdecode.heads.kangaroo`).

A draft runs the target's first `exit_layer` layers on its own KV cache (as `early-exit` does),
then the adapter, whose attention keeps its own keys and values, then the adapter's copy of the
target's output layer over the draft vocabulary. Drafts stop after a token the adapter gives less
than `min_confidence` (Kangaroo's second early exit; 0.6 by default, as the paper's).

State kept in step with the target: the adapter's cache holds one entry per committed token but
the last, made from the states entering layer `exit_layer` that the verification forward computes
anyway (`hidden_layers`); after each verification the rows of the root and the accepted nodes
are run through the adapter at the next `propose`, and the drafts' entries are dropped with the
target's. What a draft wrote never reaches the target's output: verification reruns every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from specdecode.backends.base import Backend, LayerPlan
from specdecode.drafters.base import NO_TARGET_OUTPUT, Drafter, DrafterResources, TargetOutput
from specdecode.drafters.partial_target import PartialTargetDrafter, require_layer_plans
from specdecode.errors import SpecDecodeError
from specdecode.heads import head_dir, loaded
from specdecode.heads.kangaroo import WEIGHTS_FILE, KangarooAdapter, load_adapter
from specdecode.tree import Budget, DraftTree
from specdecode.trees import TreeShape
from specdecode.verify.base import Verdict

#: Committed states run through the adapter in pieces of at most this many (a long prompt's
#: attention scores would otherwise be prompt x prompt at once).
_FEED_CHUNK = 512


class KangarooDrafter(PartialTargetDrafter):
    name = "kangaroo"

    def __init__(
        self,
        target: Backend,
        adapter: KangarooAdapter,
        min_confidence: float = 0.6,
        adapt_confidence: bool = False,
        tree: TreeShape | None = None,
    ) -> None:
        super().__init__(target, min_confidence, adapt_confidence, tree)
        self.adapter = adapter
        self.exit_plan = LayerPlan(exit_layer=adapter.cfg.exit_layer)
        self.exit_plan.check(self.num_layers)
        self.hidden_layers = (adapter.cfg.exit_layer,)
        self.cache = adapter.new_cache(target.max_context)
        self.vocab_size = target.vocab_size
        self.target_ids = adapter.target_ids.cpu()  # [draft_vocab]
        self._pending: list[torch.Tensor] = []  # [n, H] committed states not yet in the cache
        self._committed = 0

    @classmethod
    def create(cls, options: dict[str, Any], resources: DrafterResources) -> Drafter:
        unknown = set(options) - {"head", "min_confidence", "adapt_confidence"}
        if unknown:
            raise SpecDecodeError(
                "the 'kangaroo' drafter takes only head, min_confidence and adapt_confidence, "
                f"got {sorted(unknown)}"
            )
        target = resources.target
        require_layer_plans(target, cls.name)
        config = target.model_config
        if config is None or not target.supports_hidden_states:
            raise SpecDecodeError(target.hidden_states_refusal)
        if config.family != "llama":
            raise SpecDecodeError(
                f"Kangaroo adapters draft for Llama / Qwen2 targets, not {config.family}"
            )
        directory = head_dir(options.pop("head", None), resources.model_name, "kangaroo")
        table = target.token_embeddings(torch.zeros(1, dtype=torch.long))  # its dtype and device
        adapter = loaded(
            directory / WEIGHTS_FILE,
            (config, table.dtype, table.device),
            lambda: load_adapter(directory, config, dtype=table.dtype, device=table.device),
        )
        return cls(target, adapter, **options, tree=resources.tree)

    def plan(self, context: Sequence[int]) -> LayerPlan:
        return self.exit_plan

    def start(self, prompt: Sequence[int], target: TargetOutput) -> None:
        self.cache.length = self._committed = 0
        self._pending = []
        if len(prompt) > 1:
            if target.hidden is None or target.hidden.shape[0] != len(prompt) - 1:
                raise RuntimeError("the kangaroo drafter needs the prompt's hidden states")
            self._pending.append(target.hidden[:, 0])

    def update(self, verdict: Verdict, target: TargetOutput = NO_TARGET_OUTPUT) -> None:
        super().update(verdict, target)
        if target.hidden is None:
            raise RuntimeError("the kangaroo drafter needs the verification's hidden states")
        rows = [0] + [node + 1 for node in verdict.path]  # the root and the accepted nodes
        self._pending.append(target.hidden[rows, 0])

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        if self._pending:
            states = torch.cat(self._pending)  # [n, H]
            self._pending = []
            for start in range(0, states.shape[0], _FEED_CHUNK):
                piece = states[start : start + _FEED_CHUNK]
                positions = torch.arange(self._committed, self._committed + piece.shape[0])
                self.adapter.step(self.cache, piece, positions)
                self._committed += piece.shape[0]
        if self._committed != len(context) - 1:
            raise RuntimeError("the kangaroo drafter's cache is out of step with the context")
        return super().propose(context, budget)

    def draft_logits(
        self,
        plan: LayerPlan,
        ids: torch.Tensor,  # [T]
        positions: torch.Tensor | None,  # [T]
        mask: torch.Tensor | None,  # [T, S]
    ) -> torch.Tensor:  # [T, V]
        if positions is None:
            start = self.target.num_cached
            positions = torch.arange(start, start + ids.shape[0])
        states = self.target.forward_partial(ids, plan, positions, mask, hidden=True)  # [T, H]
        out = self.adapter.step(self.cache, states, positions, mask)
        draft_logits = self.adapter.logits(out).float().cpu()  # [T, draft_vocab]
        logits = torch.full((ids.shape[0], self.vocab_size), float("-inf"))
        logits[:, self.target_ids] = draft_logits
        return logits

    def drop_drafts(self, committed: int) -> None:
        super().drop_drafts(committed)
        self.cache.length = committed
