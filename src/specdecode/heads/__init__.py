"""Trained draft heads: small networks that draft from the target's own hidden states.

`eagle3.py` holds the EAGLE-3 head, `medusa.py` the Medusa-1 heads, `hydra.py` the Hydra
heads and `kangaroo.py` Kangaroo's early-exit adapter, with their checkpoints. A
model's own head, made by `specdecode train-drafter`, lives in the cache (`default_head_dir`),
where the drafter of its kind finds it when no `--head` is given.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from specdecode.errors import SpecDecodeError
from specdecode.models.install import cache_root
from specdecode.models.registry import REGISTRY

#: The kinds of trained drafter, and the drafter each is used by.
HEAD_KINDS = ("eagle", "medusa", "hydra", "kangaroo")


def _model_dir(model: str) -> Path:
    """The cache folder of `model`'s heads: a registry model by name, any other by its path's
    name and a hash of the path."""
    if model in REGISTRY:
        key = model
    else:
        path = str(Path(model).expanduser().resolve())
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).name)[:60] or "model"
        key = f"{stem}-{hashlib.sha256(path.encode()).hexdigest()[:10]}"
    return cache_root() / "heads" / key


def default_head_dir(model: str, kind: str) -> Path:
    """Where `train-drafter` writes `model`'s head of `kind` unless told, and where the drafter
    looks for it."""
    return _model_dir(model) / kind


def default_data_dir(model: str) -> Path:
    """Where `train-drafter` keeps `model`'s training answers and features unless told: one
    folder for every head kind, so a second kind reuses the answers the first one paid for."""
    return _model_dir(model) / "data"


def train_command(model: str, kind: str) -> str:
    """The one command that makes `model`'s head of `kind` where the drafter looks for it."""
    return f"specdecode train-drafter --model {model} --kind {kind}"


def head_dir(head: str | Path | None, model: str, kind: str) -> Path:
    """The head a drafter uses: `head` if given, else the model's own head of `kind`, or a line
    saying the one command that makes it."""
    if head is not None:
        return Path(head).expanduser()
    directory = default_head_dir(model, kind)
    if not (directory / "config.json").is_file():
        raise SpecDecodeError(
            f"no {kind} head for {model or 'this model'} yet: make it with "
            f"`{train_command(model or 'MODEL', kind)}` (see docs/heads.md), or pass --head DIR"
        )
    return directory


#: Heads loaded in this process, by file and placement: a benchmark or certify run generates many
#: times with the same head, and reading its weights each time would cost seconds.
_LOADED: dict[tuple, Any] = {}


def loaded(weights: Path, placement: tuple, load: Callable[[], Any]) -> Any:
    """`load()`'s head, reused while `weights` is unchanged and asked for in the same
    `placement` (target config, dtype, device); one head at a time, as they are large."""
    try:
        stamp = weights.expanduser().stat()
        key = (str(weights.expanduser().resolve()), stamp.st_mtime_ns, stamp.st_size, *placement)
    except OSError:
        return load()  # the loader says what is missing
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load()
    return _LOADED[key]
