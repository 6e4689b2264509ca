"""Named methods the benchmark can run: our engine's configurations and peer baselines.

A method is one way of producing a completion. Ours run through `SpecDecoder` with a `SpecConfig`;
peers run another tool on the same weights and prompt (transformers' `generate`, plain or with its
assisted generation / prompt lookup), so speed-ups are comparable with what a user would otherwise
run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specdecode.config import SpecConfig
from specdecode.errors import SpecDecodeError


@dataclass(frozen=True)
class Method:
    name: str
    spec: SpecConfig | None = None  # our engine; None for a peer
    peer: str | None = None  # "hf-ar", "hf-assisted", "hf-prompt-lookup"
    needs_draft_model: bool = False
    description: str = ""
    options: dict = field(default_factory=dict)


BASELINE = Method("none", SpecConfig(drafter="none"), description="plain autoregressive decoding")

BUILTIN: dict[str, Method] = {
    m.name: m
    for m in [
        BASELINE,
        Method(
            "prompt-lookup",
            SpecConfig(drafter="prompt-lookup"),
            description="prompt lookup, heuristic draft length",
        ),
        Method(
            "prompt-lookup-k10",
            SpecConfig(drafter="prompt-lookup", controller="fixed", num_draft_tokens=10),
            description="prompt lookup, 10 tokens",
        ),
        Method(
            "draft-model",
            SpecConfig(drafter="draft-model"),
            needs_draft_model=True,
            description="draft model, heuristic draft length",
        ),
        Method(
            "draft-model-adaptive",
            SpecConfig(drafter="draft-model", drafter_options={"min_confidence": 0.4}),
            needs_draft_model=True,
            description="draft model, stops drafting below 0.4 confidence",
        ),
        Method(
            "draft-model-k4",
            SpecConfig(drafter="draft-model", controller="fixed", num_draft_tokens=4),
            needs_draft_model=True,
            description="draft model, 4 tokens",
        ),
        Method("hf-ar", peer="hf-ar", description="transformers generate()"),
        Method(
            "hf-assisted",
            peer="hf-assisted",
            needs_draft_model=True,
            description="transformers assisted generation with the draft model",
        ),
        Method(
            "hf-prompt-lookup",
            peer="hf-prompt-lookup",
            description="transformers prompt lookup decoding",
        ),
    ]
}


def parse_methods(names: str) -> list[Method]:
    methods = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in BUILTIN:
            known = ", ".join(BUILTIN)
            raise SpecDecodeError(f"unknown method {name!r}; choose from: {known}")
        methods.append(BUILTIN[name])
    if not methods:
        raise SpecDecodeError("no methods given: name at least one, e.g. --methods prompt-lookup")
    return methods
