"""Peer baselines: other tools' own generation on the same weights, run in the same process.

- `HFPeer`: transformers' `generate()`, plain (`hf-ar`), assisted by the draft model
  (`hf-assisted`), or with prompt lookup (`hf-prompt-lookup`). transformers reads the GGUF file.
- `LlamaCppPeer`: llama-cpp-python's plain decoding (`llamacpp-ar`) of the same GGUF file, as
  quantized as it is shipped (the optional extra `specdecode[llamacpp]`, built from source).
- `LlamaServerPeer`: llama.cpp's own `llama-server` on the same GGUF file, decoding plainly
  (`llamacpp-server`) or with one of its n-gram speculations: `llamacpp-server-ngram`
  (`ngram-simple`: a 12-token match, up to 48 tokens copied), `llamacpp-server-ngram-mod` (its
  rolling-hash n-gram map, shared across requests) and `llamacpp-server-ngram-cache` (n-gram
  statistics of the context).
  The binary is built by `benchmarks/build_llama_server.sh` from the llama.cpp sources that
  llama-cpp-python vendors; it runs as a child process on a local port.

Each is given the prompt as token ids and generates up to `max_new_tokens`, stopping at EOS.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from specdecode.backends.llamacpp import INSTALL_HINT as LLAMACPP_INSTALL_HINT
from specdecode.config import SamplingParams
from specdecode.errors import SpecDecodeError

INSTALL_HINTS = {
    "hf": "pip install 'specdecode[hf]'",
    "llamacpp": LLAMACPP_INSTALL_HINT,
}


@dataclass
class PeerOutput:
    token_ids: list[int]
    seconds: float
    prefill_seconds: float | None = None  # until the first token: the prompt's evaluation
    # Decoding forwards after the first token, and the tokens they emitted, where the peer says
    # (llama-server's timings): tokens per forward comparable with our records'.
    target_forwards: int | None = None
    emitted_tokens: int | None = None


class Peer(Protocol):
    def generate(
        self,
        kind: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        eos_token_ids: frozenset[int],
    ) -> PeerOutput: ...


SERVER_HINT = "build llama-server with: bash benchmarks/build_llama_server.sh (about 10 minutes)"

#: llama-server's flags per peer: plain decoding, and its n-gram speculation (defaults otherwise).
SERVER_FLAGS = {
    "llamacpp-server": [],
    "llamacpp-server-ngram": ["--spec-type", "ngram-simple"],
    "llamacpp-server-ngram-mod": ["--spec-type", "ngram-mod"],
    "llamacpp-server-ngram-cache": ["--spec-type", "ngram-cache"],
}


def llama_server_path() -> Path:
    from specdecode.models.install import cache_root

    override = os.environ.get("SPECDECODE_LLAMA_SERVER")
    return Path(override) if override else cache_root() / "bin" / "llama-server"


def missing_package(kind: str) -> str | None:
    """The install hint when the package a peer needs is absent, else None."""
    if kind in SERVER_FLAGS:
        return None if llama_server_path().is_file() else SERVER_HINT
    family = "llamacpp" if kind.startswith("llamacpp") else "hf"
    modules = ["llama_cpp"] if family == "llamacpp" else ["transformers", "accelerate", "gguf"]
    if any(importlib.util.find_spec(module) is None for module in modules):
        return INSTALL_HINTS[family]
    return None


def _cut_at_eos(tokens: list[int], eos_token_ids: frozenset[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[:i]
    return tokens


class HFPeer:
    """transformers' `generate()`, plain, assisted by a draft model, or with prompt lookup."""

    def __init__(self, model_name: str, draft_name: str | None, dtype: torch.dtype) -> None:
        hint = missing_package("hf-ar")
        if hint:
            raise SpecDecodeError(f"the hf-* peer baselines need transformers: {hint}")
        self.model = _load_hf(model_name, dtype)
        self.draft = _load_hf(draft_name, dtype) if draft_name else None

    def generate(
        self,
        kind: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        eos_token_ids: frozenset[int],
    ) -> PeerOutput:
        extra: dict = {}
        if kind == "hf-assisted":
            if self.draft is None:
                raise SpecDecodeError("hf-assisted needs --draft-model")
            extra["assistant_model"] = self.draft
        elif kind == "hf-prompt-lookup":
            extra["prompt_lookup_num_tokens"] = 10
        if not sampling.greedy:
            torch.manual_seed(sampling.seed or 0)
            extra.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            extra["top_k"] = sampling.top_k or 0
        input_ids = torch.tensor([prompt_ids])
        eos = sorted(eos_token_ids)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=sampling.max_new_tokens,
                do_sample=extra.pop("do_sample", False),
                eos_token_id=eos,
                pad_token_id=eos[0] if eos else None,
                **extra,
            )
        seconds = time.perf_counter() - start
        new = _cut_at_eos(out[0, len(prompt_ids) :].tolist(), eos_token_ids)
        return PeerOutput(new, seconds)


def _load_hf(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from specdecode.models import resolve_gguf

    gguf_path = resolve_gguf(name)
    if gguf_path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model.eval()


class LlamaCppPeer:
    """llama-cpp-python decoding the registry's GGUF file token by token."""

    def __init__(self, model_name: str, threads: int, context: int = 4096) -> None:
        hint = missing_package("llamacpp-ar")
        if hint:
            raise SpecDecodeError(f"the llamacpp-ar peer needs llama-cpp-python: {hint}")
        from specdecode.backends.llamacpp import import_llama_cpp
        from specdecode.models import resolve_gguf

        # Through specdecode's import, as the llamacpp backend: one kernel setup per process (see
        # reserve_kernels).
        llama_cpp = import_llama_cpp()

        path = resolve_gguf(model_name)
        if path is None:
            raise SpecDecodeError(f"llamacpp-ar needs a GGUF model; {model_name!r} is not one")
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=context, n_threads=threads, n_batch=512, verbose=False
        )

    def generate(
        self,
        kind: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        eos_token_ids: frozenset[int],
    ) -> PeerOutput:
        self.llm.reset()
        tokens: list[int] = []
        first_token_at: float | None = None
        start = time.perf_counter()
        for token in self.llm.generate(
            prompt_ids,
            temp=sampling.temperature,
            top_k=sampling.top_k or 0,
            top_p=sampling.top_p,
            min_p=0.0,  # llama-cpp-python's default 0.05 would narrow sampling beyond ours
            reset=True,
        ):
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if token in eos_token_ids:
                break
            tokens.append(token)
            if len(tokens) >= sampling.max_new_tokens:
                break
        prefill = None if first_token_at is None else first_token_at - start
        return PeerOutput(tokens, time.perf_counter() - start, prefill)


class LlamaServerPeer:
    """llama.cpp's `llama-server` as a child process, asked for one completion per prompt."""

    def __init__(self, kind: str, model_name: str, threads: int, context: int = 4096) -> None:
        from specdecode.backends.llamacpp import user_environment
        from specdecode.models import resolve_gguf

        binary = llama_server_path()
        if not binary.is_file():
            raise SpecDecodeError(f"the {kind} peer needs llama-server at {binary}: {SERVER_HINT}")
        path = resolve_gguf(model_name)
        if path is None:
            raise SpecDecodeError(f"{kind} needs a GGUF model; {model_name!r} is not one")
        with socket.socket() as probe:  # a free local port
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [
            str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-tb", str(threads), "-c", str(context), "-np", "1",
            "--no-webui", *SERVER_FLAGS[kind],
        ]  # fmt: skip
        # Its log goes to a file: a pipe nobody drains would fill and stall the server.
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the server)
        # llama-server runs as users run it, whatever specdecode's own kernels need.
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=self.log, env=user_environment()
        )
        atexit.register(self.close)
        self._wait_until_ready(kind)

    def _wait_until_ready(self, kind: str, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                lines = [line.strip() for line in self.log.read().splitlines() if line.strip()]
                last = lines[-1] if lines else f"exit status {self.process.returncode}"
                raise SpecDecodeError(f"llama-server for {kind} exited: {last}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.close()
        raise SpecDecodeError(f"llama-server for {kind} did not start within {timeout:.0f} s")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()

    def generate(
        self,
        kind: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        eos_token_ids: frozenset[int],
    ) -> PeerOutput:
        request = {
            "prompt": prompt_ids,
            "n_predict": sampling.max_new_tokens,
            "temperature": sampling.temperature,  # 0: greedy
            "top_k": sampling.top_k or 0,
            "top_p": sampling.top_p,
            "min_p": 0.0,  # the server's default 0.05 would narrow sampling beyond ours
            "seed": sampling.seed if sampling.seed is not None else -1,
            "cache_prompt": False,  # every run evaluates its prompt, as ours do
            "return_tokens": True,
        }
        body = json.dumps(request).encode()
        start = time.perf_counter()
        post = urllib.request.Request(
            self.url + "/completion", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(post, timeout=3600) as response:
            reply = json.load(response)
        seconds = time.perf_counter() - start
        tokens = _cut_at_eos([int(t) for t in reply.get("tokens", [])], eos_token_ids)
        timings = reply.get("timings", {})
        prompt_ms = timings.get("prompt_ms")
        forwards = emitted = None
        if "predicted_n" in timings:
            # The prompt's forward gives the first token; each later forward emits its accepted
            # drafts and one token of its own. draft_n_accepted is absent where nothing drafted.
            emitted = max(int(timings["predicted_n"]) - 1, 0)
            forwards = emitted - int(timings.get("draft_n_accepted", 0))
        return PeerOutput(
            tokens, seconds, None if prompt_ms is None else prompt_ms / 1000, forwards, emitted
        )
