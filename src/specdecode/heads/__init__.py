"""Trained draft heads: small networks that draft from the target's own hidden states.

`eagle3.py` holds the EAGLE-3 head and its checkpoints. A model's own head, made by
`specdecode train-drafter`, lives in the cache (`default_head_dir`), where `--drafter eagle`
finds it when no `--head` is given.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from specdecode.models.install import cache_root
from specdecode.models.registry import REGISTRY

#: The kinds of trained drafter, and the drafter each is used by.
HEAD_KINDS = ("eagle",)


def default_head_dir(model: str, kind: str) -> Path:
    """Where `train-drafter` writes `model`'s head of `kind` unless told, and where the drafter
    looks for it: a registry model by name, any other by its path's name and a hash of the path."""
    if model in REGISTRY:
        key = model
    else:
        path = str(Path(model).expanduser().resolve())
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).name)[:60] or "model"
        key = f"{stem}-{hashlib.sha256(path.encode()).hexdigest()[:10]}"
    return cache_root() / "heads" / key / kind


def train_command(model: str, kind: str) -> str:
    """The one command that makes `model`'s head of `kind` where the drafter looks for it."""
    return f"specdecode train-drafter --model {model} --kind {kind}"
