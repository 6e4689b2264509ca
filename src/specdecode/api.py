"""The Python API: load a model (and optionally a draft model), then generate or stream.

    >>> import specdecode
    >>> llm = specdecode.load("qwen2.5-coder-0.5b-instruct")
    >>> result = llm.generate("Write a Python function that checks if a number is prime.")
    >>> print(result.text, result.stats.summary())

Speculation is configured per call with `SpecConfig` (drafter, verifier, controller, draft
length) and sampling with `SamplingParams`; the defaults are greedy decoding with prompt lookup.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from specdecode.backends.base import Backend
from specdecode.config import SamplingParams, SpecConfig
from specdecode.engine import Engine, GenerationStats, StepOutput
from specdecode.errors import SpecDecodeError

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
# Token ids a draft model scores, besides special and fed ones (see SpecDecoder.load): on the
# core suite, 32768 of Qwen2.5's 151936 took the 1.5B / 0.5B pair from 1.61x to 1.71x (not
# measured on other families).
DEFAULT_DRAFT_VOCABULARY = 32768
BACKENDS = (
    "torch",
    "hf",
    "llamacpp",
    "llamacpp-matched",
    "llamacpp-narrow",
    "llamacpp-wide",
    "llamacpp-stock",
)
#: The llama.cpp kernels (LlamaCppBackend) that each llamacpp backend runs.
#: None: the fastest exact kernels for the file (see llamacpp_kernels).
LLAMACPP_KERNELS = {
    "llamacpp": None,
    "llamacpp-matched": "matched",
    "llamacpp-narrow": "narrow",
    "llamacpp-wide": "wide",
    "llamacpp-stock": "stock",
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise SpecDecodeError(
            f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}"
        ) from None


def llamacpp_kernels(backend: str, gguf_path: Path) -> str:
    """The llama.cpp kernels (LlamaCppBackend) that a llamacpp backend runs a GGUF file on: for
    `llamacpp`, the fastest exact ones for the file in this process, with a warning when they are
    not the matched kernels."""
    from specdecode.backends.llamacpp import best_exact_kernels

    kernels = LLAMACPP_KERNELS[backend]
    if kernels is not None:
        return kernels
    kernels, reason = best_exact_kernels(gguf_path)
    if reason is not None:
        warnings.warn(
            f"specdecode: llama.cpp verifies on its narrow exact kernels ({reason}), which cost "
            "more per drafted token than the matched kernels",
            RuntimeWarning,
            stacklevel=3,
        )
    return kernels


def _load_backend(
    name_or_path: str,
    backend: str,
    dtype: torch.dtype,
    device: str,
    max_context: int | None,
    quantize: str | None = None,
):
    """(backend, tokenizer) for a registry name or local path."""
    from specdecode.models import load_checkpoint, load_tokenizer, resolve_gguf

    if backend == "torch":
        from specdecode.backends.torch import TorchBackend

        checkpoint = load_checkpoint(name_or_path, dtype=dtype)
        model = TorchBackend.from_checkpoint(
            checkpoint, dtype=dtype, device=device, max_context=max_context, quantize=quantize
        )
        return model, checkpoint.tokenizer
    if backend == "hf":
        from specdecode.backends.hf import HFBackend

        if quantize is not None:
            raise SpecDecodeError("the hf backend does not quantize: use --draft-quantize none")

        tokenizer = load_tokenizer(name_or_path)
        gguf_path = resolve_gguf(name_or_path)
        if gguf_path is not None:
            model = HFBackend.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype, device=device
            )
        else:
            model = HFBackend.from_pretrained(str(name_or_path), dtype=dtype, device=device)
        return model, tokenizer
    if backend in LLAMACPP_KERNELS:
        from specdecode.backends.llamacpp import (
            LlamaCppBackend,
            require_llama_cpp,
            reserve_kernels,
        )

        if quantize is not None:
            raise SpecDecodeError(
                "the llamacpp backend runs GGUF files as they are quantized: "
                "use --draft-quantize none"
            )
        require_llama_cpp()  # one line on how to install it, before installing a model
        gguf_path = resolve_gguf(name_or_path)
        if gguf_path is None:
            raise SpecDecodeError(
                f"the llamacpp backend needs a GGUF file; {name_or_path!r} is a Hugging Face "
                "directory: use --backend torch or hf"
            )
        kernels = llamacpp_kernels(backend, gguf_path)
        reserve_kernels([kernels])  # before llama.cpp starts
        model = LlamaCppBackend(
            gguf_path,
            threads=torch.get_num_threads(),
            max_context=max_context or 4096,
            kernels=kernels,
        )
        return model, load_tokenizer(name_or_path)
    raise SpecDecodeError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


class SpecDecoder:
    """A target model, its tokenizer and an optional draft model, ready to generate."""

    def __init__(
        self,
        target: Backend,
        tokenizer,
        draft_model: Backend | None = None,
        name: str = "",
        target_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.draft_model = draft_model
        self.name = name
        self.engine = Engine(target, tokenizer, draft_model)
        self.target_dtype = target_dtype

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        draft_model: str | None = None,
        backend: str = "torch",
        dtype: str | torch.dtype = "bfloat16",
        device: str = "cpu",
        threads: int | None = None,
        max_context: int | None = None,
        draft_quantize: str | None = "int8",
        draft_vocabulary: int | None = DEFAULT_DRAFT_VOCABULARY,
    ) -> SpecDecoder:
        """Load `model` (a registry name, a GGUF file or a Hugging Face directory).

        The draft model's weights are int8 by default (`draft_quantize=None` keeps `dtype`): a
        draft only proposes tokens that the target then checks, so its precision changes speed,
        never output, and int8 weights make its CPU forwards faster. For the same reason a torch
        draft model scores only the first `draft_vocabulary` token ids (a byte-pair vocabulary's
        most frequent merges), the special tokens and the tokens it has been fed, which makes its
        output layer cheaper; `draft_vocabulary=None` scores them all.
        """
        if draft_vocabulary is not None and draft_vocabulary < 1:
            raise SpecDecodeError(
                f"the draft vocabulary must be at least 1 token (--draft-vocabulary 0 scores them "
                f"all), got {draft_vocabulary}"
            )
        if threads is not None:
            if threads < 1:
                raise SpecDecodeError(f"threads must be at least 1, got {threads}")
            torch.set_num_threads(threads)
        torch_dtype = _dtype(dtype)
        if draft_model is not None:  # refuse a mismatched pair before loading any weights
            from specdecode.models import load_tokenizer

            if load_tokenizer(draft_model).fingerprint != load_tokenizer(model).fingerprint:
                raise SpecDecodeError(
                    f"the draft model {draft_model!r} has a different tokenizer from {model!r}: "
                    "choose a draft model of the same family"
                )
        target, tokenizer = _load_backend(model, backend, torch_dtype, device, max_context)
        draft = None
        if draft_model is not None:
            if backend != "torch":
                draft_quantize = None
            # A draft's numerics never reach the output: on llama.cpp it keeps the stock kernels,
            # which decode one token fastest.
            draft_backend = "llamacpp-stock" if backend in LLAMACPP_KERNELS else backend
            draft, _ = _load_backend(
                draft_model, draft_backend, torch_dtype, device, max_context, draft_quantize
            )
            if draft_vocabulary is not None and draft_backend == "torch":
                common = range(min(draft_vocabulary, draft.vocab_size))
                draft.limit_draft_vocabulary([*common, *tokenizer.special_token_ids])
        return cls(target, tokenizer, draft, name=str(model), target_dtype=torch_dtype)

    def encode_prompt(self, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
        """Token ids for `prompt`, wrapped in the model's chat template when `chat` is set."""
        if not prompt or not prompt.strip():
            raise SpecDecodeError("the prompt is empty: give some text to continue or answer")
        if chat and self.tokenizer.has_chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids for a conversation (role / content dicts ending with a user turn), through
        the chat template; without one, the turns' text joined by blank lines."""
        if self.tokenizer.has_chat_template:
            text = self.tokenizer.apply_chat_template(messages)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.encode_prompt("\n\n".join(m["content"] for m in messages), chat=False)

    def stream(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        spec: SpecConfig | None = None,
        chat: bool = True,
    ) -> Iterator[StepOutput]:
        """Yield the output step by step, as tokens are accepted."""
        ids = prompt if isinstance(prompt, list) else self.encode_prompt(prompt, chat=chat)
        return self.engine.stream(ids, sampling or SamplingParams(), spec or self.default_spec())

    def generate(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        spec: SpecConfig | None = None,
        chat: bool = True,
    ) -> GenerationResult:
        """Generate to completion."""
        token_ids: list[int] = []
        text = ""
        stats = GenerationStats()
        for step in self.stream(prompt, sampling, spec, chat):
            token_ids.extend(step.token_ids)
            text += step.text
            stats = step.stats
        return GenerationResult(text, token_ids, stats)

    def default_spec(self) -> SpecConfig:
        """Draft with the draft model when there is one, else with prompt lookup."""
        return SpecConfig(drafter="draft-model" if self.draft_model else "prompt-lookup")


def load(model: str = DEFAULT_MODEL, **kwargs) -> SpecDecoder:
    """Shorthand for `SpecDecoder.load`."""
    return SpecDecoder.load(model, **kwargs)
