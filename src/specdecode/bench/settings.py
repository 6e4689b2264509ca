"""The settings of a benchmark run, kept beside its records in DIR/settings.json.

Records measured under different settings (another model, temperature or token count, or another
definition of a method under the same name) must not meet in one report. A run writes its settings
once its models have loaded; `--resume` and `--report-only` first compare them with the command's
and refuse, in one line naming the setting, to mix records. Only what has records is compared:
a setting or method that was written down but never measured constrains nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from specdecode.errors import SpecDecodeError

FILE_NAME = "settings.json"

# The settings that decide what a record measures, by the flag that sets them. Categories and
# repeats are not among them: a run may grow by either.
FLAGS = {
    "suite": "--suite",
    "model": "--model",
    "draft_model": "--draft-model",
    "backend": "--backend",
    "dtype": "--dtype",
    "temperature": "--temperature",
    "max_new_tokens": "--max-new-tokens",
    "seed": "--seed",
    "draft_quantize": "--draft-quantize",
    "draft_vocabulary": "--draft-vocabulary",
    # Not flags: known once the models have loaded (see of_loaded).
    "llamacpp_kernels": "llama.cpp kernels",
    "llamacpp_specdecode_kernels": "specdecode's kernels in llama.cpp (with matched kernels)",
    "llamacpp_tiled_kernel": "llama.cpp's tiled kernel (off with wide kernels, or with "
    "GGML_CPU_TILED_MM=0)",
    "torch_products": "the torch backend's matrix products (SPECDECODE_TILES, SPECDECODE_KERNELS)",
}
# Settings known only after the models load; None before.
LOADED_SETTINGS = (
    "llamacpp_kernels",
    "llamacpp_specdecode_kernels",
    "llamacpp_tiled_kernel",
    "torch_products",
)
# What `torch_products` says when the products ran on the AMX tiles, which SPECDECODE_TILES=1 asks.
AMX_TILES = "AMX tiles"
# The kernels each llamacpp backend ran before the settings kept them (from 9b4e3ad on).
LEGACY_KERNELS = {"llamacpp": "narrow", "llamacpp-wide": "wide", "llamacpp-stock": "stock"}
# Settings that matter only to methods with a draft model; None when no method has one.
DRAFT_SETTINGS = ("draft_model", "draft_quantize", "draft_vocabulary")
# Settings that may name a file: compared by the file's absolute path, however it is spelled.
PATH_SETTINGS = ("suite", "model", "draft_model")


def of_loaded(decoders: dict, llamacpp_ar: bool) -> dict:
    """The settings known once the models have loaded: the kernels each llamacpp backend runs
    (`decoders` maps backend names to loaded SpecDecoders), and whether the llama.cpp of this
    process (ours and llama-cpp-python's) runs specdecode's kernels (with the matched kernels,
    every model does) and its tiled kernel; None where the run has no llama.cpp. (llama-server
    runs as users run it: not a setting of the run.)"""
    from specdecode.backends import llamacpp_matched
    from specdecode.backends.llamacpp import LlamaCppBackend, tiled_kernel_off

    loaded = dict.fromkeys(LOADED_SETTINGS)
    loaded["torch_products"] = _torch_products(decoders)
    kernels = {
        backend: decoder.target.kernels
        for backend, decoder in sorted(decoders.items())
        if isinstance(decoder.target, LlamaCppBackend)
    }
    if kernels or llamacpp_ar:
        loaded["llamacpp_kernels"] = kernels or None
        loaded["llamacpp_specdecode_kernels"] = llamacpp_matched.loaded()
        loaded["llamacpp_tiled_kernel"] = "off" if tiled_kernel_off() else "on"
    return loaded


def _torch_products(decoders: dict) -> str | None:
    """Which products the torch backend's forwards ran on (each rounds its own way, so greedy
    outputs are compared only with a baseline on the same), or None where no target is torch.
    The tiles take bfloat16 rows only: a float32 model stays on the row-wise kernels."""
    import torch

    from specdecode.backends.torch import TorchBackend, kernels

    torch_decoders = [d for d in decoders.values() if isinstance(d.target, TorchBackend)]
    if not torch_decoders:
        return None
    if kernels.rowwise_linear() is None:
        return "library"
    bfloat16 = any(d.target_dtype == torch.bfloat16 for d in torch_decoders)
    return AMX_TILES if bfloat16 and kernels.tiles_chosen() else "row-wise kernels"


def recorded(out_dir: Path, key: str) -> object:
    """The value of setting `key` kept in `out_dir`, or None."""
    stored = _read(out_dir)
    return None if stored is None else stored["settings"].get(key)


def _legacy_llamacpp_settings(stored: dict) -> dict:
    # Files written before these settings were kept come from versions that turned the tiled
    # kernel off for every process that ran llama.cpp, and ran LEGACY_KERNELS.
    backends = {stored["settings"].get("backend")} | {
        m.get("backend") for m in stored["methods"].values()
    }
    kernels = {b: LEGACY_KERNELS[b] for b in sorted(backends & LEGACY_KERNELS.keys())} or None
    peers = any(m.get("peer") == "llamacpp-ar" for m in stored["methods"].values())
    return {
        "llamacpp_kernels": kernels,
        "llamacpp_specdecode_kernels": False if kernels or peers else None,
        "llamacpp_tiled_kernel": "off" if kernels or peers else None,
    }


def of_command(args: argparse.Namespace, methods) -> dict:
    """This command's settings and method definitions, as they read back from the file."""
    uses_draft = any(m.needs_draft_model for m in methods)
    settings = {}
    for key in FLAGS:
        value = getattr(args, key, None)
        if key in LOADED_SETTINGS or (key in DRAFT_SETTINGS and not uses_draft):
            value = None
        elif key in PATH_SETTINGS and isinstance(value, str) and Path(value).exists():
            value = str(Path(value).resolve())
        settings[key] = value
    definitions = {
        m.name: {
            "spec": None if m.spec is None else asdict(m.spec),
            "peer": m.peer,
            "backend": m.backend,
        }
        for m in methods
    }
    # Through JSON and back, so that comparisons with the file are like for like.
    return json.loads(json.dumps({"settings": settings, "methods": definitions}, default=str))


def check(out_dir: Path, command: dict, measured: set[str]) -> None:
    """Refuse (SpecDecodeError) when the records of `measured` methods in `out_dir` were made
    under other settings, or another definition of one of these methods, than `command`'s."""
    stored = _read(out_dir)
    if stored is None:
        if measured:
            print(
                f"warning: {out_dir} has no {FILE_NAME} (a run begun before settings were kept): "
                "its records are taken to share this command's settings, unchecked",
                file=sys.stderr,
            )
        return
    if not measured:
        return
    for key, value in _legacy_llamacpp_settings(stored).items():
        stored["settings"].setdefault(key, value)
    # the backends that measured records ran on: only their kernels bind the run
    run_backend = stored["settings"].get("backend")
    measured_backends = {
        stored["methods"][name].get("backend") or run_backend
        for name in measured & set(stored["methods"])
        if stored["methods"][name].get("peer") is None
    }
    for key, flag in FLAGS.items():
        before, now = stored["settings"].get(key), command["settings"][key]
        if isinstance(before, dict) and isinstance(now, dict):
            shared = set(before) & set(now) & measured_backends
            before = {k: v for k, v in sorted(before.items()) if k in shared}
            now = {k: v for k, v in sorted(now.items()) if k in shared}
        if before is not None and now is not None and before != now:
            raise SpecDecodeError(
                f"the records in {out_dir} were made with {flag} {_shown(before)}, this command "
                f"has {_shown(now)}: use the run's settings, or start another run with a new --out"
            )
    for name in sorted(measured & set(stored["methods"]) & set(command["methods"])):
        if stored["methods"][name] != command["methods"][name]:
            raise SpecDecodeError(
                f"method {name} is defined differently from the one whose records are in "
                f"{out_dir}: use the run's definition, or give the new one another name"
            )


def _shown(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}={item}" for key, item in value.items())
    return str(value)


def write(out_dir: Path, command: dict) -> None:
    """Keep `command`'s settings in `out_dir`, beside those of methods it does not run."""
    stored = _read(out_dir) or {"settings": {}, "methods": {}}
    for key, value in _legacy_llamacpp_settings(stored).items():
        stored["settings"].setdefault(key, value)
    settings = {
        key: stored["settings"].get(key) if value is None else value
        for key, value in command["settings"].items()
    }
    for key, value in command["settings"].items():  # backends this command did not load stay
        if isinstance(value, dict) and isinstance(stored["settings"].get(key), dict):
            settings[key] = {**stored["settings"][key], **value}
    methods = {**stored["methods"], **command["methods"]}
    path = out_dir / FILE_NAME
    partial = path.with_name(FILE_NAME + ".tmp")
    partial.write_text(json.dumps({"settings": settings, "methods": methods}, indent=1) + "\n")
    os.replace(partial, path)  # atomic: a run killed while writing never leaves half a file


def _read(out_dir: Path) -> dict | None:
    path = out_dir / FILE_NAME
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        if isinstance(stored["settings"], dict) and isinstance(stored["methods"], dict):
            return stored
    except (ValueError, KeyError, TypeError):
        pass
    raise SpecDecodeError(
        f"{path} is not a settings file this version wrote: move it away to resume without the "
        "check, or start another run with a new --out"
    )
