"""Layer-skip self-speculation: the target drafts with some of its sublayers left out.

Two ways to choose them:

- On the fly (SWIFT, Xia et al., ICLR 2025): `skip_ratio` of the middle layers' attention and MLP
  sublayers are skipped, and which ones is searched during decoding (`layer_search.SkipSearch`):
  once a request has `window` tokens of output, each step scores one candidate set on them (one
  partial forward over the window) until the search ends (a score of `good_enough`, or
  `max_tries` candidates, 200 by default where SWIFT tries 1000 on a GPU: each costs a
  forward over the window); the search and its best set last across requests, as long as the
  process (the server, a bench run), so later requests draft with the set found.
- From a file (Draft & Verify, Zhang et al., ACL 2024): `skip_file`, a set `specdecode tune-skip`
  searched once on calibration text; no search while decoding.

Drafts stop after a token the partial model doubts (`min_confidence`, 0.6 by default; with
`adapt_confidence`, Draft & Verify's rule moves it after each verification). See
`partial_target.py` for how drafts share the target's KV cache and never reach its output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from specdecode.backends.base import Backend, LayerPlan
from specdecode.drafters.base import NO_TARGET_OUTPUT, DrafterResources, TargetOutput
from specdecode.drafters.layer_search import (
    PlanScorer,
    SkipSearch,
    load_plan,
    plan_of,
    skip_count,
)
from specdecode.drafters.partial_target import PartialTargetDrafter
from specdecode.errors import SpecDecodeError
from specdecode.trees import TreeShape


class LayerSkipDrafter(PartialTargetDrafter):
    name = "layer-skip"
    # What lasts across requests is the search over the target's layers, never a request's text.
    keeps_model_statistics = True

    def __init__(
        self,
        target: Backend,
        skip_ratio: float = 0.45,
        skip_file: str | None = None,
        window: int = 32,
        max_tries: int = 200,
        good_enough: float = 0.95,
        min_confidence: float = 0.6,
        adapt_confidence: bool = False,
        tree: TreeShape | None = None,
        shared: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(target, min_confidence, adapt_confidence, tree)
        if window < 1 or max_tries < 0:
            raise SpecDecodeError(
                f"layer-skip needs window >= 1 and max_tries >= 0, got {window}, {max_tries}"
            )
        self.window = window
        self.max_tries = max_tries
        self.good_enough = good_enough
        self.fixed: LayerPlan | None = None
        self.search: SkipSearch | None = None
        if skip_file is not None:
            self.fixed = load_plan(skip_file, self.num_layers)
        else:
            count = skip_count(self.num_layers, skip_ratio)
            key = f"layer-skip:{self.num_layers}:{count}:{seed}"
            store = shared if shared is not None else {}
            self.search = store.setdefault(key, SkipSearch(self.num_layers, count, seed))
        self.start((), NO_TARGET_OUTPUT)

    @classmethod
    def create(cls, options: dict[str, Any], resources: DrafterResources) -> LayerSkipDrafter:
        return cls(resources.target, **options, tree=resources.tree, shared=resources.shared)

    def start(self, prompt: Sequence[int], target: TargetOutput) -> None:
        self.prompt_length = len(prompt)
        self.scorer: PlanScorer | None = None

    @property
    def searching(self) -> bool:
        search = self.search
        return search is not None and not (
            search.tries >= self.max_tries
            or (search.best_score is not None and search.best_score >= self.good_enough)
        )

    def plan(self, context: Sequence[int]) -> LayerPlan:
        if self.fixed is not None:
            return self.fixed
        assert self.search is not None
        if self.searching:
            self._search_step(context)
        return self.search.best_plan

    def _search_step(self, context: Sequence[int]) -> None:
        """One candidate scored on the request's first `window` output tokens, once cached."""
        assert self.search is not None
        if self.scorer is None:
            if self.target.num_cached < self.prompt_length + self.window:
                return
            self.scorer = PlanScorer(self.target, context, self.prompt_length, self.window)
            if self.search.best_score is not None:  # scored on another request's window
                self.search.rescore_best(self.scorer.score(self.search.best_plan))
                return
        candidate = self.search.candidate()
        self.search.report(candidate, self.scorer.score(plan_of(candidate)))
