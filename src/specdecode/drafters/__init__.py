"""Drafters, one file each, looked up by name."""

from typing import Any

from specdecode.drafters.base import Drafter, DrafterResources, TargetOutput
from specdecode.drafters.clasp import ClaspDrafter
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.drafters.eagle import EagleDrafter
from specdecode.drafters.early_exit import EarlyExitDrafter
from specdecode.drafters.hydra import HydraDrafter
from specdecode.drafters.kangaroo import KangarooDrafter
from specdecode.drafters.layer_skip import LayerSkipDrafter
from specdecode.drafters.lookahead import LookaheadDrafter
from specdecode.drafters.medusa import MedusaDrafter
from specdecode.drafters.none import NoDrafter
from specdecode.drafters.prompt_lookup import PromptLookupDrafter
from specdecode.drafters.rest import RestDrafter
from specdecode.drafters.sam import SamDrafter
from specdecode.drafters.suffix import SuffixDrafter
from specdecode.drafters.token_recycling import TokenRecyclingDrafter
from specdecode.errors import SpecDecodeError

DRAFTERS: dict[str, type[Drafter]] = {
    cls.name: cls
    for cls in (
        NoDrafter,
        PromptLookupDrafter,
        SuffixDrafter,
        SamDrafter,
        RestDrafter,
        LookaheadDrafter,
        TokenRecyclingDrafter,
        DraftModelDrafter,
        EagleDrafter,
        MedusaDrafter,
        HydraDrafter,
        LayerSkipDrafter,
        EarlyExitDrafter,
        KangarooDrafter,
        ClaspDrafter,
    )
}


def make_drafter(name: str, options: dict[str, Any], resources: DrafterResources) -> Drafter:
    try:
        cls = DRAFTERS[name]
    except KeyError:
        known = ", ".join(sorted(DRAFTERS))
        raise SpecDecodeError(f"unknown drafter {name!r}; choose one of: {known}") from None
    if resources.tree is not None and not cls.supports_trees:
        raise SpecDecodeError(
            f"the {name!r} drafter drafts chains only; use --drafter draft-model for --tree "
            f"{resources.tree.name}"
        )
    try:
        return cls.create(dict(options), resources)
    except TypeError as exc:
        raise SpecDecodeError(f"bad options for drafter {name!r}: {exc}") from None


__all__ = ["DRAFTERS", "Drafter", "DrafterResources", "TargetOutput", "make_drafter"]
