"""The Python API: load a model (and optionally a draft model), then generate, chat or stream.

    >>> import specdecode
    >>> llm = specdecode.load("qwen2.5-coder-0.5b-instruct")
    >>> result = llm.generate("Write a Python function that checks if a number is prime.")
    >>> print(result.text, result.stats.summary())

Speculation is configured with `SpecConfig` (drafter, verifier, controller, draft length), once at
`load(..., spec=...)` or per call, and sampling with `SamplingParams`; the defaults are greedy
decoding, drafted by prompt lookup (or by the draft model, when one is loaded) with the
cost-aware controller.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import torch

from specdecode.backends.base import Backend
from specdecode.config import SamplingParams, SpecConfig
from specdecode.engine import Engine, GenerationStats, StepOutput
from specdecode.errors import SpecDecodeError
from specdecode.models.tokenizer import Tokenizer

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
# Token ids a draft model scores, besides special and fed ones (see SpecDecoder.load): on the
# core suite, 32768 of Qwen2.5's 151936 took the 1.5B / 0.5B pair from 1.61x to 1.71x (not
# measured on other families).
DEFAULT_DRAFT_VOCABULARY = 32768
#: The model backends: our compact transformer, transformers, llama.cpp.
BACKENDS = ("torch", "hf", "llamacpp")
DEVICES = ("cpu", "cuda")
#: The llama.cpp kernels a llamacpp backend verifies on (LlamaCppBackend); `auto` picks the
#: fastest exact ones for the file (see llamacpp_kernels).
KERNELS = ("auto", "matched", "narrow", "wide", "stock")
#: The name of a llamacpp backend on chosen kernels, as the benchmark's methods files, records
#: and settings spell it (and as --backend took it before --kernels existed), by kernels.
_LLAMACPP_NAMES = {
    "auto": "llamacpp",
    "matched": "llamacpp-matched",
    "narrow": "llamacpp-narrow",
    "wide": "llamacpp-wide",
    "stock": "llamacpp-stock",
}
#: Every backend name the benchmark records: a backend, or a llamacpp backend on chosen kernels
#: -> (backend, kernels).
BACKEND_NAMES: dict[str, tuple[str, str]] = {
    "torch": ("torch", "auto"),
    "hf": ("hf", "auto"),
    **{name: ("llamacpp", kernels) for kernels, name in _LLAMACPP_NAMES.items()},
}
#: The llama.cpp kernels (LlamaCppBackend) that each llamacpp backend name runs.
#: None: the fastest exact kernels for the file (see llamacpp_kernels).
LLAMACPP_KERNELS: dict[str, str | None] = {
    name: None if kernels == "auto" else kernels for kernels, name in _LLAMACPP_NAMES.items()
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def checked_backend(backend: str, kernels: str = "auto", device: str = "cpu") -> str:
    """The benchmark's name for `backend` on `kernels` (`llamacpp-narrow`, or `torch`), after
    checking the three together, in one line each, before anything loads: kernels other than auto
    are llama.cpp's, llama.cpp runs on the CPU, and CUDA must be there to be asked for."""
    if backend not in BACKENDS:
        raise SpecDecodeError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if kernels not in KERNELS:
        raise SpecDecodeError(f"unknown kernels {kernels!r}; choose one of: {', '.join(KERNELS)}")
    if device not in DEVICES:
        raise SpecDecodeError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    if backend != "llamacpp" and kernels != "auto":
        raise SpecDecodeError(
            f"kernels {kernels!r} are llama.cpp's: they go with backend llamacpp, not {backend}"
        )
    if backend == "llamacpp" and device != "cpu":
        raise SpecDecodeError("the llamacpp backend runs on the CPU: use --device cpu")
    if device == "cuda" and not torch.cuda.is_available():
        why = (
            "this PyTorch build has no CUDA support"
            if torch.version.cuda is None
            else "PyTorch finds no CUDA device"
        )
        raise SpecDecodeError(f"--device cuda: {why}; use --device cpu")
    return backend if backend != "llamacpp" else _LLAMACPP_NAMES[kernels]


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


def _not_a_gguf_file(name_or_path: str) -> SpecDecodeError:
    """llama.cpp reads GGUF files only: the one line for a Hugging Face directory or id."""
    return SpecDecodeError(
        f"the llamacpp backend needs a GGUF file; {name_or_path!r} is a Hugging Face "
        "model: use --backend torch or hf, or give a .gguf file"
    )


def _load_backend(
    name_or_path: str,
    backend: str,
    dtype: torch.dtype,
    device: str,
    max_context: int | None,
    quantize: str | None = None,
    sequences: int = 1,
):
    """(backend, tokenizer) for a registry name or local path; `sequences`: see
    `SpecDecoder.load`."""
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
        if Path(name_or_path).expanduser().is_dir():  # before asking for llama.cpp: no use
            raise _not_a_gguf_file(name_or_path)
        require_llama_cpp()  # one line on how to install it, before installing a model
        gguf_path = resolve_gguf(name_or_path)
        if gguf_path is None:
            raise _not_a_gguf_file(name_or_path)
        kernels = llamacpp_kernels(backend, gguf_path)
        reserve_kernels([kernels])  # before llama.cpp starts
        model = LlamaCppBackend(
            gguf_path,
            threads=torch.get_num_threads(),
            max_context=max_context or 4096,
            kernels=kernels,
            sequences=sequences,
        )
        return model, load_tokenizer(name_or_path)
    raise SpecDecodeError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


#: The roles a chat message may have.
CHAT_ROLES = ("system", "user", "assistant")


class SpecDecoder:
    """A target model, its tokenizer and an optional draft model, ready to generate.

    `spec` is the speculative configuration of every call that names none (see `load`).
    """

    def __init__(
        self,
        target: Backend,
        tokenizer: Tokenizer,
        draft_model: Backend | None = None,
        name: str = "",
        target_dtype: torch.dtype = torch.bfloat16,
        spec: SpecConfig | None = None,
    ) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.draft_model = draft_model
        self.name = name
        self.engine = Engine(target, tokenizer, draft_model, name, tokenizer.fingerprint)
        self.target_dtype = target_dtype
        self.spec = spec or self.default_spec()

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        draft_model: str | None = None,
        *,
        spec: SpecConfig | None = None,
        backend: str = "torch",
        kernels: str = "auto",
        dtype: str | torch.dtype = "bfloat16",
        device: str = "cpu",
        threads: int | None = None,
        max_context: int | None = None,
        draft_quantize: str | None = "int8",
        draft_vocabulary: int | None = DEFAULT_DRAFT_VOCABULARY,
        sequences: int = 1,
    ) -> SpecDecoder:
        """Load `model`: a registry name, a GGUF file, a Hugging Face directory, or a Hugging
        Face model id whose weights are in the local Hugging Face cache.

        `spec` is the speculative configuration of every call that names none (default: prompt
        lookup, or the draft model when `draft_model` is given, with the cost-aware controller).

        `backend` is `torch` (our compact transformer), `hf` (transformers) or `llamacpp` (the
        GGUF file as quantized); `kernels` chooses llama.cpp's kernels for the last (`auto`: the
        fastest exact ones for the file; `matched`, `narrow`, `wide` exact; `stock` llama.cpp's
        own, not guaranteed token-identical to plain decoding). The names of earlier versions,
        `backend="llamacpp-narrow"` and the like, are taken too. `device` is `cpu` or `cuda`
        (torch and hf backends).

        The draft model's weights are int8 by default (`draft_quantize=None` keeps `dtype`): a
        draft only proposes tokens that the target then checks, so its precision changes speed,
        never output, and int8 weights make its CPU forwards faster. For the same reason a torch
        draft model scores only the first `draft_vocabulary` token ids (a byte-pair vocabulary's
        most frequent merges), the special tokens and the tokens it has been fed, which makes its
        output layer cheaper; `draft_vocabulary=None` scores them all.

        `sequences`: how many sequences at once the models will run (a server's batch: the
        backends' `fork`s); the llama.cpp backend sizes its KV cache for them.
        """
        from specdecode.models import resolve_model

        # One name per backend and kernels pair; the combined names of earlier versions (which
        # methods files and records still use) are read as that pair.
        if backend in BACKEND_NAMES and backend not in BACKENDS:
            if kernels != "auto":
                raise SpecDecodeError(
                    f"backend {backend!r} already names its kernels: give backend='llamacpp', "
                    f"kernels={kernels!r}"
                )
            backend, kernels = BACKEND_NAMES[backend]
        name = checked_backend(backend, kernels, device)
        if spec is not None:  # before loading any weights (the engine checks it again per call)
            _check_drafter_has_model(spec, draft_model is not None)
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
        model = resolve_model(model)
        if draft_model is not None:
            draft_model = resolve_model(draft_model)
        if draft_model is not None:  # refuse a mismatched pair before loading any weights
            from specdecode.models import load_tokenizer

            if load_tokenizer(draft_model).fingerprint != load_tokenizer(model).fingerprint:
                raise SpecDecodeError(
                    f"the draft model {draft_model!r} has a different tokenizer from {model!r}: "
                    "choose a draft model of the same family"
                )
        target, tokenizer = _load_backend(
            model, name, torch_dtype, device, max_context, sequences=sequences
        )
        draft = None
        if draft_model is not None:
            if backend != "torch":
                draft_quantize = None
            # A draft's numerics never reach the output: on llama.cpp it keeps the stock kernels,
            # which decode one token fastest.
            draft_backend = "llamacpp-stock" if backend == "llamacpp" else backend
            draft, _ = _load_backend(
                draft_model,
                draft_backend,
                torch_dtype,
                device,
                max_context,
                draft_quantize,
                sequences,
            )
            if draft_vocabulary is not None and draft_backend == "torch":
                common = range(min(draft_vocabulary, draft.vocab_size))
                draft.limit_draft_vocabulary([*common, *tokenizer.special_token_ids])
        return cls(target, tokenizer, draft, name=str(model), target_dtype=torch_dtype, spec=spec)

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

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids for a conversation (role / content dicts ending with a user turn), through
        the chat template; without one, the turns' text joined by blank lines."""
        turns = _checked_messages(messages)
        if self.tokenizer.has_chat_template:
            text = self.tokenizer.apply_chat_template(turns)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.encode_prompt("\n\n".join(m["content"] for m in turns), chat=False)

    def stream(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams | None = None,
        spec: SpecConfig | None = None,
        chat: bool = True,
    ) -> Iterator[StepOutput]:
        """Yield the output of one prompt (text, or token ids) step by step, as tokens are
        accepted. `spec` overrides the configuration given at load for this call."""
        ids = self._prompt_ids(prompt, chat)
        return self.engine.stream(ids, sampling or SamplingParams(), spec or self.spec)

    @overload
    def generate(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams | None = None,
        spec: SpecConfig | None = None,
        chat: bool = True,
    ) -> GenerationResult: ...

    @overload
    def generate(
        self,
        prompt: list[str],
        sampling: SamplingParams | None = None,
        spec: SpecConfig | None = None,
        chat: bool = True,
    ) -> list[GenerationResult]: ...

    def generate(
        self,
        prompt: str | Sequence[int] | list[str],
        sampling: SamplingParams | None = None,
        spec: SpecConfig | None = None,
        chat: bool = True,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate to completion. A prompt is a text (wrapped in the chat template unless
        `chat=False`) or a list of token ids, and gives one result; a list of texts gives a list
        of results, one per text, in order (generated one after another, each as it would be
        alone). `spec` overrides the configuration given at load for this call."""
        if _is_text_list(prompt):
            # Every prompt is encoded (and checked) before the first is generated, so that a bad
            # one fails at once rather than after minutes of work on the others.
            encoded = [self._prompt_ids(text, chat) for text in prompt]
            return [self._generate_one(ids, sampling, spec, chat=False) for ids in encoded]
        return self._generate_one(prompt, sampling, spec, chat)

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        sampling: SamplingParams | None = None,
        spec: SpecConfig | None = None,
    ) -> GenerationResult:
        """The assistant's next turn in a conversation: OpenAI-style messages
        ([{"role": "system" | "user" | "assistant", "content": "..."}, ...]) through the model's
        chat template. `spec` overrides the configuration given at load for this call."""
        return self._generate_one(self.encode_chat(messages), sampling, spec, chat=False)

    def default_spec(self) -> SpecConfig:
        """Draft with the draft model when there is one, else with prompt lookup."""
        return SpecConfig(drafter="draft-model" if self.draft_model else "prompt-lookup")

    def _generate_one(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams | None,
        spec: SpecConfig | None,
        chat: bool,
    ) -> GenerationResult:
        token_ids: list[int] = []
        text = ""
        stats = GenerationStats()
        for step in self.stream(prompt, sampling, spec, chat):
            token_ids.extend(step.token_ids)
            text += step.text
            stats = step.stats
        return GenerationResult(text, token_ids, stats)

    def _prompt_ids(self, prompt: str | Sequence[int], chat: bool) -> list[int]:
        if isinstance(prompt, str):
            return self.encode_prompt(prompt, chat=chat)
        if _is_token_ids(prompt):
            return list(prompt)
        if _is_text_list(prompt):
            raise SpecDecodeError(
                "stream takes one prompt at a time: give a text or a list of token ids"
            )
        raise SpecDecodeError(
            "a prompt is a text, a list of token ids (ints) or, for generate, a list of texts; "
            f"got {_describe(prompt)}"
        )


def _is_token_ids(value: object) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _is_text_list(value: object) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) > 0
        and all(isinstance(t, str) for t in value)
    )


def _describe(value: object) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 0:
            return "an empty list"
        kinds = sorted({type(item).__name__ for item in value})
        return f"{_article(type(value).__name__)} of {', '.join(kinds)}"
    return _article(type(value).__name__)


def _article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _checked_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The messages as plain dicts, after checking their shape, so that a mistake says what is
    wrong in one line rather than deep inside the chat template."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise SpecDecodeError(
            'messages are a non-empty list of {"role": ..., "content": ...} dicts, got '
            + _describe(messages)
        )
    turns = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping):
            raise SpecDecodeError(f"message {number} is {_describe(message)}, not a dict")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise SpecDecodeError(
                f"message {number} has role {role!r}; choose one of: {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(content, str):
            raise SpecDecodeError(f"message {number} has no text content (a str)")
        turns.append({"role": role, "content": content})
    if not any(t["content"].strip() for t in turns):
        raise SpecDecodeError("the messages are empty: give some text to answer")
    return turns


def _check_drafter_has_model(spec: SpecConfig, has_draft_model: bool) -> None:
    from specdecode.drafters import DRAFTERS

    drafter = DRAFTERS.get(spec.drafter)
    if drafter is not None and drafter.needs_draft_model and not has_draft_model:
        raise SpecDecodeError(
            f"the {spec.drafter!r} drafter needs a draft model: load one with draft_model=... "
            "(--draft-model on the command line)"
        )


#: `specdecode.load(...)` is `SpecDecoder.load(...)`: the same typed arguments.
load = SpecDecoder.load
