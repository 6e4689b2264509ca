"""Peer baselines: transformers' own generation on the same weights, run in the same process."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specdecode.errors import SpecDecodeError


@dataclass
class PeerOutput:
    token_ids: list[int]
    seconds: float


class HFPeer:
    """transformers' `generate()`, plain, assisted by a draft model, or with prompt lookup."""

    def __init__(self, model_name: str, draft_name: str | None, dtype: torch.dtype) -> None:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise SpecDecodeError(
                "the hf-* peer baselines need transformers: pip install 'specdecode[hf]'"
            ) from None
        self.model = _load(model_name, dtype)
        self.draft = _load(draft_name, dtype) if draft_name else None

    def generate(
        self, kind: str, prompt_ids: list[int], max_new_tokens: int, eos_token_ids: frozenset[int]
    ) -> PeerOutput:
        extra: dict = {}
        if kind == "hf-assisted":
            if self.draft is None:
                raise SpecDecodeError("hf-assisted needs --draft-model")
            extra["assistant_model"] = self.draft
        elif kind == "hf-prompt-lookup":
            extra["prompt_lookup_num_tokens"] = 10
        input_ids = torch.tensor([prompt_ids])
        eos = sorted(eos_token_ids)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos[0] if eos else None,
                **extra,
            )
        seconds = time.perf_counter() - start
        new = out[0, len(prompt_ids) :].tolist()
        for i, token in enumerate(new):
            if token in eos_token_ids:
                new = new[:i]
                break
        return PeerOutput(new, seconds)


def _load(name: str, dtype: torch.dtype):
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
