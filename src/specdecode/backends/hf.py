"""The `hf` backend: any transformers causal LM through its public API, for chains only.

For models our compact transformer does not cover. The KV cache is transformers' `DynamicCache`;
rollback is `crop()`. Tree masks are refused: verifying trees needs the `torch` backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specdecode.backends.base import Backend
from specdecode.errors import SpecDecodeError


class HFBackend(Backend):
    supports_trees = False
    hidden_states_refusal = (
        "the hf backend does not hand out hidden states for trained draft heads yet: use "
        "--backend torch"
    )

    def __init__(self, model, max_context: int | None = None) -> None:
        context = max_context or model.config.get_text_config().max_position_embeddings
        super().__init__(model.get_output_embeddings().weight.shape[0], context)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self._cache = None
        self._length = 0

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        gguf_file: str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: str = "cpu",
        max_context: int | None = None,
    ) -> HFBackend:
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise SpecDecodeError(
                "the hf backend needs transformers: pip install 'specdecode[hf]'"
            ) from None
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device)
        return cls(model, max_context)

    @property
    def num_cached(self) -> int:
        return self._length

    def forward(self, token_ids, positions=None, tree_mask=None, return_logits=True):
        from transformers import DynamicCache

        if tree_mask is not None:
            raise SpecDecodeError("the hf backend verifies chains only: use --backend torch")
        if self._cache is None:
            self._cache = DynamicCache(config=self.model.config)
        count = int(token_ids.shape[0])
        with torch.inference_mode():
            out = self.model(
                input_ids=token_ids.to(self.device)[None],
                past_key_values=self._cache,
                use_cache=True,
                logits_to_keep=count if return_logits else 1,
            )
        self._length += count
        return out.logits[0].float().cpu() if return_logits else None

    def truncate(self, length: int) -> None:
        if self._cache is not None and length < self._length:
            # Recent transformers take the number of tokens to drop, as a negative count.
            self._cache.crop(length - self._length)
        self._length = min(self._length, length)
        if length == 0:
            self._cache = None

    def keep(self, start: int, offsets: Sequence[int]) -> None:
        if list(offsets) != list(range(len(offsets))):
            raise SpecDecodeError("the hf backend keeps chain prefixes only")
        self.truncate(start + len(offsets))
