"""The `torch` backend: our compact transformer behind the `Backend` contract."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from specdecode.backends.base import Backend, LayerPlan
from specdecode.backends.torch.invariance import MAX_INVARIANT_ROWS
from specdecode.backends.torch.kv_cache import KVCache
from specdecode.backends.torch.model import Rows, Transformer, rms_norm
from specdecode.backends.torch.quant import Int8Linear, PartialHead, quantize_int8
from specdecode.errors import SpecDecodeError
from specdecode.models.config import TransformerConfig
from specdecode.tree import DraftTree

DEFAULT_MAX_CONTEXT = 8192
QUANTIZATIONS = (None, "int8")
# Forward sizes whose batch invariance is probed at load (chains of up to 16 drafts and the root);
# larger ones are probed on first use.
INVARIANT_WARM_UP_ROWS = 17


class TorchBackend(Backend):
    """A Llama / Qwen2 / Gemma 3 model with a static KV cache, on CPU or CUDA."""

    supports_trees = True
    supports_hidden_states = True
    supports_batching = True
    supports_layer_plans = True

    def __init__(
        self,
        config: TransformerConfig,
        state_dict: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        max_context: int | None = None,
        quantize: str | None = None,
    ) -> None:
        """`quantize="int8"` stores the linear layers' weights in int8 (for draft models only:
        it changes the logits, and turns off the padding that makes them batch-invariant)."""
        if quantize not in QUANTIZATIONS:
            raise SpecDecodeError(
                f"unknown quantization {quantize!r}; choose one of: none, "
                + ", ".join(q for q in QUANTIZATIONS if q)
            )
        max_context = max_context or min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        if max_context < 2:
            raise SpecDecodeError(f"the context must hold at least 2 tokens, got {max_context}")
        super().__init__(config.vocab_size, max_context)
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.quantize = quantize
        with torch.device("meta"):
            model = Transformer(config, batch_invariant=quantize is None)
        model = model.to_empty(device=self.device)
        model.load_hf_state_dict(state_dict)
        model = model.to(dtype=dtype).eval().requires_grad_(False)
        self.model = quantize_int8(model) if quantize == "int8" else model
        if quantize is None:
            self.model.warm_up_invariance(INVARIANT_WARM_UP_ROWS)
        self.model.setup_rope(max_context)
        self.cache = KVCache(config, max_context, dtype, self.device)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        max_context: int | None = None,
        quantize: str | None = None,
    ):
        return cls(checkpoint.config, checkpoint.state_dict, dtype, device, max_context, quantize)

    def limit_draft_vocabulary(self, always: Sequence[int]) -> None:
        """Score only the tokens `always` and those fed to the model (`PartialHead`): for a draft
        model, whose output layer is then that much cheaper."""
        head = self.model.lm_head
        if isinstance(head, PartialHead):
            head = head.head
        if not isinstance(head, (Int8Linear, nn.Linear)):  # the target's batch-invariant layer
            raise SpecDecodeError("only a draft model's output layer scores part of the vocabulary")
        self.model.lm_head = PartialHead(head, torch.as_tensor(list(always), dtype=torch.long))

    def reset(self) -> None:
        super().reset()
        if isinstance(self.model.lm_head, PartialHead):
            self.model.lm_head.forget()

    @property
    def num_cached(self) -> int:
        return self.cache.length

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def model_config(self) -> TransformerConfig:
        return self.config

    def token_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return self.model.embed.weight[token_ids.to(self.device)]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        cfg = self.config
        offset = 1.0 if cfg.family == "gemma3" else 0.0
        weight = self.model.final_norm
        return rms_norm(hidden.to(weight.device, weight.dtype), weight, cfg.rms_norm_eps, offset)

    def forward(
        self,
        token_ids: torch.Tensor,  # [T]
        positions: torch.Tensor | None = None,  # [T]
        tree_mask: torch.Tensor | None = None,  # [T, S] bool, S >= T (see Backend.forward)
        return_logits: bool = True,
    ) -> torch.Tensor | None:  # [T, V] float32 (on the CPU)
        if isinstance(self.model.lm_head, PartialHead):
            self.model.lm_head.include(token_ids)
        rows = self._rows(token_ids, positions, tree_mask)
        with torch.inference_mode():
            (logits,) = self.model([rows], return_logits, self.hidden_layers)
        return None if logits is None else logits.cpu()

    def forward_partial(
        self,
        token_ids: torch.Tensor,  # [T]
        plan: LayerPlan,
        positions: torch.Tensor | None = None,  # [T]
        tree_mask: torch.Tensor | None = None,  # [T, S] bool, S >= T
        hidden: bool = False,
    ) -> torch.Tensor:  # [T, V] float32 (on the CPU), or [T, H] with `hidden`
        plan.check(self.config.num_layers)
        rows = self._rows(token_ids, positions, tree_mask)
        rows.captured = None  # the hidden states captured are the full forwards' alone
        with torch.inference_mode():
            (out,) = self.model([rows], True, (), plan, return_hidden=hidden)
        assert out is not None
        return out if hidden else out.cpu()

    def forward_layer(
        self,
        layer: int,
        hidden: torch.Tensor,  # [T, H]
        positions: torch.Tensor,  # [T]
        tree_mask: torch.Tensor,  # [T, S] bool, S >= T
    ) -> torch.Tensor:  # [T, H]
        if not 0 <= layer < self.config.num_layers:
            raise ValueError(f"layer {layer} of a {self.config.num_layers}-layer model")
        rows = self._rows(torch.zeros(hidden.shape[0], dtype=torch.long), positions, tree_mask)
        with torch.inference_mode():
            return self.model.forward_block(layer, hidden.to(self.device, self.dtype), rows)

    def _rows(
        self,
        token_ids: torch.Tensor,  # [T]
        positions: torch.Tensor | None,  # [T]
        tree_mask: torch.Tensor | None,  # [T, S]
    ) -> Rows:
        """This sequence's part of a forward, checked to fit its cache (positions and mask
        default to a chain after the cached tokens)."""
        count = int(token_ids.shape[0])
        if count == 0:
            raise ValueError("forward() needs at least one token")
        if self.cache.length + count > self.max_context:
            raise SpecDecodeError(
                f"the sequence would exceed the context of {self.max_context} tokens: "
                "lower --max-new-tokens or shorten the prompt"
            )
        if positions is None:
            positions = torch.arange(self.cache.length, self.cache.length + count)
        if tree_mask is None:
            tree_mask = torch.ones(count, count, dtype=torch.bool).tril_()
        elif not (
            tree_mask.shape[0] == count and count <= tree_mask.shape[1] <= self.cache.length + count
        ):
            raise ValueError(f"tree_mask of shape {tuple(tree_mask.shape)} for {count} new tokens")
        return Rows(
            token_ids.to(self.device),
            positions.to(self.device),
            tree_mask.to(self.device),
            self.cache,
            self._captured,
        )

    def fork(self) -> TorchBackend:
        """Another sequence on the same weights: a cache of its own (and, for a draft model that
        scores part of the vocabulary, its own scored set: what one sequence was fed is not
        another's), no copy of a weight."""
        twin = copy.copy(self)
        Backend.__init__(twin, self.vocab_size, self.max_context)
        twin.cache = KVCache(self.config, self.max_context, self.dtype, self.device)
        head = self.model.lm_head
        if isinstance(head, PartialHead):
            twin.model = copy.copy(self.model)
            twin.model._modules = dict(self.model._modules)  # the copy's own module table
            twin.model.lm_head = PartialHead(head.head, head.always)
        return twin

    def forward_trees(
        self, sequences: Sequence[Backend], trees: Sequence[DraftTree]
    ) -> list[torch.Tensor]:  # per sequence: [N+1, V]
        """One forward over every sequence's tree, when they are this model's forks and their
        rows fit the batch-invariant products (else in as few forwards as fit)."""
        if not all(isinstance(b, TorchBackend) and b.model is self.model for b in sequences) or (
            len({b.hidden_layers for b in sequences}) > 1
        ):
            return super().forward_trees(sequences, trees)
        capture = sequences[0].hidden_layers if sequences else ()
        if len({id(b.cache) for b in sequences}) != len(sequences):
            raise ValueError("forward_trees() got the same sequence twice")
        inputs = [b.tree_inputs(tree) for b, tree in zip(sequences, trees, strict=True)]
        logits: list[torch.Tensor] = []
        start = 0
        while start < len(sequences):
            # As many sequences as fit in one batch-invariant product (at least one).
            stop, rows = start, 0
            while stop < len(sequences) and (
                stop == start or rows + inputs[stop][0].shape[0] <= MAX_INVARIANT_ROWS
            ):
                rows += inputs[stop][0].shape[0]
                stop += 1
            parts = [b._rows(*inputs[i]) for i, b in enumerate(sequences[start:stop], start)]
            with torch.inference_mode():
                out = self.model(parts, True, capture)
            logits.extend(rows_logits.cpu() for rows_logits in out)
            start = stop
        for b in sequences:
            b.last_hidden = b.take_captured()
        return logits

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.cache.length:
            raise ValueError(f"cannot truncate a cache of {self.cache.length} to {length}")
        self.cache.length = length

    def keep(self, start: int, offsets: Sequence[int]) -> None:
        self.cache.keep(start, torch.as_tensor(list(offsets), dtype=torch.long, device=self.device))
