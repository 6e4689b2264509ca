"""Named methods the benchmark can run: our engine's configurations and peer baselines.

A method is one way of producing a completion. Ours run through `SpecDecoder` with a `SpecConfig`;
peers run another tool on the same weights and prompt (transformers' `generate`, plain, assisted
by a draft model, or with its prompt lookup; llama.cpp's plain decoding), so speed-ups compare
with what a user would otherwise run.

`--methods` takes built-in names, built-in sets (`quick`, `all-lossless`, `peers`), or a TOML file:

    [[method]]
    name = "pld-k8"                  # how the method appears in the report
    drafter = "prompt-lookup"        # or peer = "hf-ar" for a peer baseline
    controller = "fixed"
    num_draft_tokens = [4, 8, 12]    # a list makes a sweep: pld-k8-k4, pld-k8-k8, ...
    backend = "llamacpp"             # optional; default: the run's --backend
    kernels = "narrow"               # optional, llamacpp only; default: auto
    [method.drafter_options]
    strong_ngram = 4

A file's method without a `controller` key runs the heuristic controller: the default of the
versions that wrote the committed files and their records (the library's default is now
cost-aware), so that a file keeps meaning what it meant. `backend = "llamacpp-narrow"` (the
older spelling of `backend = "llamacpp"` with `kernels = "narrow"`) still reads.

A method's `backend` is kept as the benchmark's name of a backend on its kernels
(`llamacpp-narrow`; see `specdecode.api.BACKEND_NAMES`): records, baselines (`none-BACKEND`)
and settings files have always spelled it so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from specdecode.config import SpecConfig
from specdecode.drafters import DRAFTERS
from specdecode.errors import SpecDecodeError
from specdecode.trees import CHAIN, TREE_SHAPES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PEERS = {
    "hf-ar": "transformers generate(), greedy",
    "hf-assisted": "transformers assisted generation with the draft model",
    "hf-prompt-lookup": "transformers prompt lookup decoding (10 tokens)",
    "llamacpp-ar": "llama-cpp-python plain decoding of the same GGUF file",
    "llamacpp-server": "llama.cpp's llama-server, plain decoding of the same GGUF file",
    "llamacpp-server-ngram": "llama.cpp's llama-server with its ngram-simple speculation",
    "llamacpp-server-ngram-mod": "llama.cpp's llama-server with its ngram-mod speculation",
    "llamacpp-server-ngram-cache": "llama.cpp's llama-server with its ngram-cache speculation",
}


@dataclass(frozen=True)
class Method:
    name: str
    spec: SpecConfig | None = None  # our engine; None for a peer
    peer: str | None = None  # a key of PEERS
    description: str = ""
    sweep: str | None = None  # methods of one sweep share this name and differ in draft budget
    backend: str | None = None  # the model backend; None: the run's --backend

    @property
    def needs_draft_model(self) -> bool:
        if self.peer is not None:
            return self.peer == "hf-assisted"
        assert self.spec is not None
        drafter = DRAFTERS.get(self.spec.drafter)
        return bool(drafter and drafter.needs_draft_model)

    @property
    def budget(self) -> int | None:
        return None if self.spec is None else self.spec.num_draft_tokens


BASELINE = Method("none", SpecConfig(drafter="none"), description="plain autoregressive decoding")
#: The controller of the built-in methods and of a methods file's methods that name none: the
#: default when their records were made (see the module's docstring).
METHODS_CONTROLLER = "heuristic"


def _ours(name: str, description: str, **spec: Any) -> Method:
    spec.setdefault("controller", METHODS_CONTROLLER)
    return Method(name, SpecConfig(**spec), description=description)


BUILTIN: dict[str, Method] = {
    m.name: m
    for m in [
        BASELINE,
        _ours("prompt-lookup", "prompt lookup, heuristic draft length", drafter="prompt-lookup"),
        _ours(
            "prompt-lookup-k10",
            "prompt lookup, 10 tokens",
            drafter="prompt-lookup",
            controller="fixed",
            num_draft_tokens=10,
        ),
        _ours(
            "prompt-lookup-tree",
            "prompt lookup, the copies of every occurrence as a tree, 2 wide, at most 16 nodes",
            drafter="prompt-lookup",
            tree="static",
            tree_width=2,
            tree_nodes=16,
        ),
        _ours(
            "prompt-lookup-cost-aware",
            "prompt lookup, draft length from measured costs",
            drafter="prompt-lookup",
            controller="cost-aware",
        ),
        _ours(
            "suffix",
            "suffix decoding (this request, and earlier ones of its session), heuristic length",
            drafter="suffix",
        ),
        _ours(
            "suffix-tree",
            "suffix decoding, most frequent continuations as a tree, 2 wide, at most 16 nodes",
            drafter="suffix",
            tree="static",
            tree_width=2,
            tree_nodes=16,
        ),
        _ours(
            "token-recycling",
            "token recycling (successors from earlier verifications), heuristic length",
            drafter="token-recycling",
        ),
        _ours(
            "token-recycling-tree",
            "token recycling, a tree of the likeliest successors, 4 wide, at most 16 nodes",
            drafter="token-recycling",
            tree="static",
            tree_width=4,
            tree_nodes=16,
        ),
        _ours(
            "sam",
            "suffix automaton copies; below a 2-token match, the 1-token match's copy or token "
            "recycling, whichever has accepted more",
            drafter="sam",
        ),
        _ours(
            "sam-tree",
            "suffix automaton copies, else a token recycling tree, 4 wide, at most 16 nodes",
            drafter="sam",
            tree="static",
            tree_width=4,
            tree_nodes=16,
        ),
        _ours(
            "lookahead-k5",
            "lookahead decoding, 5 deep: a 4-position window of 2 levels, up to 4 trigram guesses",
            drafter="lookahead",
            tree="static",
            tree_width=4,
            tree_nodes=16,
            controller="fixed",
            num_draft_tokens=5,
        ),
        _ours("draft-model", "draft model, heuristic draft length", drafter="draft-model"),
        _ours(
            "draft-model-cost-aware",
            "draft model, draft length from measured costs",
            drafter="draft-model",
            controller="cost-aware",
        ),
        _ours(
            "draft-model-adaptive",
            "draft model, stops drafting below 0.4 confidence",
            drafter="draft-model",
            drafter_options={"min_confidence": 0.4},
        ),
        _ours(
            "draft-model-k4",
            "draft model, 4 tokens",
            drafter="draft-model",
            controller="fixed",
            num_draft_tokens=4,
        ),
        *[
            _ours(
                f"draft-model-{shape}-tree",
                f"draft model, {shape} tree, 2 wide, at most 16 nodes",
                drafter="draft-model",
                tree=shape,
                tree_width=2,
                tree_nodes=16,
            )
            for shape in ("static", "dynamic", "iid", "without-replacement", "delayed")
        ],
        _ours(
            "draft-model-traversal",
            "draft model chain, block verification (traversal)",
            drafter="draft-model",
            verifier="traversal",
        ),
        _ours(
            "draft-model-iid-tree-spectr",
            "draft model, iid tree, 2 wide, at most 16 nodes, SpecTr K-SEQ",
            drafter="draft-model",
            tree="iid",
            tree_width=2,
            tree_nodes=16,
            verifier="spectr",
        ),
        _ours(
            "draft-model-without-replacement-tree-traversal",
            "draft model, tree without replacement, 2 wide, at most 16 nodes, traversal",
            drafter="draft-model",
            tree="without-replacement",
            tree_width=2,
            tree_nodes=16,
            verifier="traversal",
        ),
        _ours("eagle", "EAGLE-3 head, heuristic draft length", drafter="eagle"),
        _ours(
            "eagle-dynamic-tree",
            "EAGLE-3 head, dynamic tree (EAGLE-2), 3 wide, at most 16 nodes",
            drafter="eagle",
            tree="dynamic",
            tree_width=3,
            tree_nodes=16,
        ),
        _ours("medusa", "Medusa-1 heads, heuristic draft length", drafter="medusa"),
        _ours(
            "medusa-dynamic-tree",
            "Medusa-1 heads, dynamic tree, 3 wide, at most 16 nodes",
            drafter="medusa",
            tree="dynamic",
            tree_width=3,
            tree_nodes=16,
        ),
        _ours("hydra", "Hydra heads, heuristic draft length", drafter="hydra"),
        _ours(
            "hydra-dynamic-tree",
            "Hydra heads, dynamic tree, 3 wide, at most 16 nodes",
            drafter="hydra",
            tree="dynamic",
            tree_width=3,
            tree_nodes=16,
        ),
        _ours(
            "layer-skip",
            "self-speculation: 45% of the middle sublayers skipped, which ones searched while "
            "decoding (SWIFT), heuristic draft length",
            drafter="layer-skip",
        ),
        _ours(
            "early-exit",
            "self-speculation: the first three quarters of the layers and the output layer, "
            "heuristic draft length",
            drafter="early-exit",
        ),
        _ours(
            "kangaroo",
            "self-speculation: the first layers, a trained Kangaroo adapter and the output layer, "
            "heuristic draft length",
            drafter="kangaroo",
        ),
        *[Method(name, peer=name, description=text) for name, text in PEERS.items()],
    ]
}
#: Built-in methods that draft with part of the target (the torch backend only).
SELF_SPECULATION = ("layer-skip", "early-exit")
#: Built-in methods that draft with the model's own trained head (made by `train-drafter`).
HEAD_METHODS = (
    *(f"{kind}{shape}" for kind in ("eagle", "medusa", "hydra") for shape in ("", "-dynamic-tree")),
    "kangaroo",
)

SETS: dict[str, list[str]] = {
    "quick": ["prompt-lookup", "draft-model"],
    # Without the head methods, which need a head trained for the model first.
    "all-lossless": [
        name
        for name, m in BUILTIN.items()
        if m.peer is None
        and name != "none"
        and name not in HEAD_METHODS
        and name not in SELF_SPECULATION
    ],
    "heads": list(HEAD_METHODS),
    "self-speculation": list(SELF_SPECULATION),
    "peers": list(PEERS),
}


def parse_methods(value: str, has_draft_model: bool = True) -> list[Method]:
    """Methods from comma-separated names and set names, or from a TOML file.

    Methods of a *set* that need a draft model are left out when there is none; a method named
    on its own that needs one is an error (raised by the caller, which knows the models).
    """
    path = Path(value)
    if value.endswith(".toml"):
        if not path.is_file():
            raise SpecDecodeError(f"no methods file at {value}")
        return load_methods_file(path)
    methods: list[Method] = []
    for name in [n.strip() for n in value.split(",") if n.strip()]:
        if name in SETS:
            members = [BUILTIN[n] for n in SETS[name]]
            methods += [m for m in members if has_draft_model or not m.needs_draft_model]
        elif name in BUILTIN:
            methods.append(BUILTIN[name])
        else:
            known = ", ".join([*BUILTIN, *SETS])
            raise SpecDecodeError(
                f"unknown method {name!r}; choose from: {known}, or give a .toml methods file"
            )
    if not methods:
        raise SpecDecodeError("no methods given: name at least one, e.g. --methods prompt-lookup")
    return _unique(methods)


_SPEC_KEYS = {
    "drafter",
    "verifier",
    "controller",
    "num_draft_tokens",
    "max_draft_tokens",
    "drafter_options",
    "controller_options",
    "tree",
    "tree_width",
    "tree_nodes",
    "tree_options",
}


def load_methods_file(path: Path) -> list[Method]:
    try:
        document = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecDecodeError(f"{path} is not valid TOML: {exc}") from None
    entries = document.get("method")
    if not isinstance(entries, list) or not entries:
        raise SpecDecodeError(f"{path} declares no [[method]] tables")
    methods: list[Method] = []
    for number, entry in enumerate(entries, start=1):
        where = f"{path}, method {number}"
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise SpecDecodeError(f"{where}: every method needs a name")
        where = f"{path}, method {entry['name']!r}"
        methods += _method_from_table(entry, where)
    return _unique(methods)


def _backend_of_table(entry: dict[str, Any], where: str) -> str | None:
    """The benchmark's name of the table's backend on its kernels (None: the run's --backend)."""
    from specdecode.api import BACKEND_NAMES, BACKENDS, checked_backend

    backend, kernels = entry.get("backend"), entry.get("kernels")
    if backend is None:
        if kernels is not None:
            raise SpecDecodeError(f'{where}: kernels = {kernels!r} needs backend = "llamacpp"')
        return None
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise SpecDecodeError(
            f"{where}: unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}"
        )
    if kernels is None:
        return backend  # a backend, or the older spelling of llamacpp on chosen kernels
    if backend not in BACKENDS:
        raise SpecDecodeError(
            f"{where}: backend {backend!r} already names its kernels: write backend = "
            f'"llamacpp" with kernels = {kernels!r}'
        )
    try:  # unknown kernels, or kernels that are not llama.cpp's
        return checked_backend(backend, kernels)
    except SpecDecodeError as exc:
        raise SpecDecodeError(f"{where}: {exc}") from None


def _method_from_table(entry: dict[str, Any], where: str) -> list[Method]:
    name, description = entry["name"], str(entry.get("description", ""))
    backend = _backend_of_table(entry, where)
    if "peer" in entry:
        extra = set(entry) - {"name", "peer", "description"}
        if extra:
            raise SpecDecodeError(f"{where}: a peer takes no {sorted(extra)}")
        if entry["peer"] not in PEERS:
            raise SpecDecodeError(f"{where}: unknown peer; choose one of: {', '.join(PEERS)}")
        return [Method(name, peer=entry["peer"], description=description)]
    unknown = set(entry) - _SPEC_KEYS - {"name", "description", "backend", "kernels"}
    if unknown:
        raise SpecDecodeError(
            f"{where}: unknown keys {sorted(unknown)}; allowed: peer, backend, kernels, "
            + ", ".join(sorted(_SPEC_KEYS))
        )
    if "drafter" not in entry:
        raise SpecDecodeError(f"{where}: give a drafter (or a peer)")
    if entry["drafter"] not in DRAFTERS:
        raise SpecDecodeError(
            f"{where}: unknown drafter {entry['drafter']!r}; choose one of: {', '.join(DRAFTERS)}"
        )
    shapes = [CHAIN, *TREE_SHAPES]
    if entry.get("tree", CHAIN) not in shapes:
        raise SpecDecodeError(
            f"{where}: unknown tree {entry['tree']!r}; choose one of: {', '.join(shapes)}"
        )
    fields = {key: value for key, value in entry.items() if key in _SPEC_KEYS}
    fields.setdefault("controller", METHODS_CONTROLLER)
    budgets = fields.pop("num_draft_tokens", 6)
    sweep = isinstance(budgets, list)
    methods = []
    for budget in budgets if sweep else [budgets]:
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise SpecDecodeError(f"{where}: num_draft_tokens must be an integer or a list of them")
        try:
            spec = SpecConfig(
                num_draft_tokens=budget,
                **{**fields, "max_draft_tokens": max(fields.get("max_draft_tokens", 16), budget)},
            )
        except TypeError as exc:
            raise SpecDecodeError(f"{where}: {exc}") from None
        except SpecDecodeError as exc:
            raise SpecDecodeError(f"{where}: {exc}") from None
        method = Method(name, spec, description=description, backend=backend)
        methods.append(replace(method, name=f"{name}-k{budget}", sweep=name) if sweep else method)
    return methods


def _unique(methods: list[Method]) -> list[Method]:
    seen: dict[str, Method] = {}
    for method in methods:
        if method.name in seen and seen[method.name] != method:
            raise SpecDecodeError(f"two different methods are named {method.name!r}")
        seen[method.name] = method
    return list(seen.values())
