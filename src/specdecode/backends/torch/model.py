"""A compact decoder-only transformer for the Llama / Qwen2 and Gemma 3 families.

One file, readable in one sitting (after gpt-fast's model.py): RMSNorm, rotary embeddings, grouped
query attention over a preallocated KV cache, and a gated MLP. The forward takes explicit positions
and a boolean attention mask over the new tokens, which is all tree attention needs.

Numerics are arranged so that a token's logits do not depend on how many tokens share its forward:
on CPU, the linear layers of forwards up to 128 tokens run on a small C++ kernel that sums every
output in one fixed order, and their attention on another that computes each row over a dense
list of the keys it may see, so that a tree node gets the bits of decoding its path alone
(`kernels/`); where they are unavailable, library products are used, a
one-token forward is padded to two rows (libraries take another path for a single row) and
larger products are split into pieces this machine computes with the same bits
(`invariance.py`). This is what lets greedy speculative decoding reproduce plain decoding token
for token (tested in `tests/test_torch_backend.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.backends.torch import kernels
from specdecode.backends.torch.invariance import (
    MAX_INVARIANT_ROWS,
    BatchInvariantLinear,
    kernel_applies,
    widen_for_prefill,
)
from specdecode.backends.torch.kv_cache import KVCache
from specdecode.models.config import TransformerConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """RMSNorm in float32; Gemma scales by (1 + w) (offset 1), Llama/Qwen by w (offset 0)."""
    x32 = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if offset:
        return (x32 * (offset + weight.float())).to(x.dtype)
    return weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Rope:
    """Rotary embedding tables, indexed by position (HF's rotate-half convention)."""

    def __init__(self, head_dim: int, base: float, max_len: int, scaling: float, device) -> None:
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        inv_freq = inv_freq / scaling
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [max_len, head_dim]
        self.cos = angles.cos().to(device)
        self.sin = angles.sin().to(device)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at `positions` [T], each [T, D]: looked up once per forward."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def apply_rope(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, sin = cos_sin  # each [T, D]; x: [heads, T, D]
    return x * cos + rotate_half(x) * sin


@dataclass(frozen=True)
class Visibility:
    """Which cache slots each row of a forward may attend; shared by all layers."""

    allowed: torch.Tensor  # [R, L] bool

    @cached_property
    def bias(self) -> torch.Tensor:  # [R, L] float32: 0 where allowed, -inf elsewhere
        """The additive form the library path needs (the kernels read `allowed`)."""
        return torch.zeros(self.allowed.shape, device=self.allowed.device).masked_fill_(
            ~self.allowed, float("-inf")
        )


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int, linear: type[nn.Linear]) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        h, d = cfg.hidden_size, cfg.head_dim
        self.qkv = linear(h, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, bias=cfg.attention_bias)
        self.o = linear(cfg.num_heads * d, h, bias=False)
        self.gate_up = linear(h, 2 * cfg.intermediate_size, bias=False)
        self.down = linear(cfg.intermediate_size, h, bias=False)
        self.input_norm = nn.Parameter(torch.ones(h))
        self.post_attn_norm = nn.Parameter(torch.ones(h))  # Llama: the pre-MLP norm
        gemma = cfg.family == "gemma3"
        self.pre_mlp_norm = nn.Parameter(torch.ones(h)) if gemma else None
        self.post_mlp_norm = nn.Parameter(torch.ones(h)) if gemma else None
        self.q_norm = nn.Parameter(torch.ones(d)) if gemma else None
        self.k_norm = nn.Parameter(torch.ones(d)) if gemma else None
        self.sliding = cfg.is_sliding_layer(layer)
        # Whether each row's attention must have the bits of decoding it alone (False for a
        # draft model, whose rounding does not matter).
        self.exact_rows = linear is BatchInvariantLinear
        scalar = cfg.query_pre_attn_scalar if gemma and cfg.query_pre_attn_scalar else d
        self.scale = 1.0 / math.sqrt(scalar)
        self.norm_offset = 1.0 if gemma else 0.0

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.cfg.rms_norm_eps, self.norm_offset)

    def attention(
        self,
        x: torch.Tensor,  # [R, h]: R >= 2 rows, the first num_new real
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin at the rows' positions
        cache: KVCache,
        write_at: int,
        num_new: int,
        visibility: Visibility,
    ) -> torch.Tensor:
        cfg = self.cfg
        rows = x.shape[0]
        heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = self.qkv(x).split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q = q.view(rows, heads, d).transpose(0, 1)  # [H, R, D]
        k = k.view(rows, kv_heads, d).transpose(0, 1)  # [Hkv, R, D]
        v = v.view(rows, kv_heads, d).transpose(0, 1)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, cfg.rms_norm_eps, 1.0)
            k = rms_norm(k, self.k_norm, cfg.rms_norm_eps, 1.0)
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)
        end = write_at + num_new
        cache.k[self.layer, :, write_at:end] = k[:, :num_new]
        cache.v[self.layer, :, write_at:end] = v[:, :num_new]
        keys = cache.k[self.layer, :, :end]  # [Hkv, L, D]
        values = cache.v[self.layer, :, :end]
        group = heads // kv_heads
        q = q.reshape(kv_heads, group * rows, d)  # queries of a kv group share its keys
        out = self._attention_per_row(q, keys, values, visibility.allowed)
        if out is not None:
            out = out.to(x.dtype).view(heads, rows, d).transpose(0, 1).reshape(rows, heads * d)
            return self.o(out)
        if rows > MAX_INVARIANT_ROWS and widen_for_prefill(keys):
            # Prefill on a CPU without bfloat16 arithmetic: float32 products are much faster.
            q, keys, values = q.float(), keys.float(), values.float()
        scores = torch.matmul(q, keys.transpose(1, 2)).float() * self.scale  # [Hkv, G*R, L]
        scores = scores.view(kv_heads, group, rows, end) + visibility.bias
        probs = torch.softmax(scores, dim=-1).to(values.dtype).view(kv_heads, group * rows, end)
        out = torch.matmul(probs, values).to(x.dtype)  # [Hkv, G*R, D]
        out = out.view(heads, rows, d).transpose(0, 1).reshape(rows, heads * d)
        return self.o(out)

    def _attention_row_by_row(
        self,
        q: torch.Tensor,  # [Hkv, G*R, D]
        keys: torch.Tensor,  # [Hkv, L, D]
        values: torch.Tensor,  # [Hkv, L, D]
        allowed: torch.Tensor,  # [R, L] bool
    ) -> torch.Tensor:  # [Hkv, G*R, D]
        """Without the kernel: each row over a dense copy of the keys it sees, so that its
        products have the shapes, and so the bits, of decoding it alone (slow, but exact)."""
        kv_heads, queries, d = q.shape
        rows = allowed.shape[0]
        q = q.view(kv_heads, queries // rows, rows, d)
        outs = []
        for row in range(rows):
            seen = allowed[row].nonzero().squeeze(1)  # [n]
            row_keys, row_values = keys[:, seen], values[:, seen]  # [Hkv, n, D]
            row_q = q[:, :, row].contiguous()  # [Hkv, G, D]
            scores = torch.matmul(row_q, row_keys.transpose(1, 2)).float() * self.scale
            probs = torch.softmax(scores, dim=-1).to(row_values.dtype)  # [Hkv, G, n]
            outs.append(torch.matmul(probs, row_values))  # [Hkv, G, D]
        return torch.stack(outs, dim=2).view(kv_heads, queries, d)

    def _attention_per_row(
        self,
        q: torch.Tensor,  # [Hkv, G*R, D]
        keys: torch.Tensor,  # [Hkv, L, D]
        values: torch.Tensor,  # [Hkv, L, D]
        allowed: torch.Tensor,  # [R, L] bool
    ) -> torch.Tensor | None:  # [Hkv, G*R, D]
        """Attention in which a row's bits depend only on the keys it sees: the kernel, or
        without it (for a model that needs exactness) row by row. None for prefill-sized
        forwards, and for draft models without the kernel, which take the batched path."""
        if allowed.shape[0] > MAX_INVARIANT_ROWS:
            return None
        attend = (
            kernels.rowwise_attention()
            if keys.device.type == "cpu" and keys.dtype in (torch.bfloat16, torch.float32)
            else None
        )
        if attend is not None:
            return attend(q.float().contiguous(), keys, values, allowed, self.scale)
        if self.exact_rows:
            return self._attention_row_by_row(q, keys, values, allowed)
        return None

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.cfg.family == "gemma3" else F.silu(gate)
        return self.down(act * up)

    def forward(self, x, rope, cache, write_at, num_new, visibility: Visibility):
        if self.pre_mlp_norm is None:  # Llama / Qwen2
            attn = self.attention(
                self.norm(x, self.input_norm), rope, cache, write_at, num_new, visibility
            )
            x = x + attn
            return x + self.mlp(self.norm(x, self.post_attn_norm))
        attn = self.attention(
            self.norm(x, self.input_norm), rope, cache, write_at, num_new, visibility
        )
        x = x + self.norm(attn, self.post_attn_norm)
        return x + self.norm(self.mlp(self.norm(x, self.pre_mlp_norm)), self.post_mlp_norm)


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, batch_invariant: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        # Pad lone rows (see the module docstring); a draft model, whose rounding may differ
        # between forwards without harm, skips it and saves the second row's work.
        self.batch_invariant = batch_invariant
        linear = BatchInvariantLinear if batch_invariant else nn.Linear
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, i, linear) for i in range(cfg.num_layers))
        self.final_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.ropes: dict[str, Rope] = {}

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load weights named as in Hugging Face checkpoints (model.layers.0.self_attn...)."""
        cfg = self.cfg
        own: dict[str, torch.Tensor] = {
            "embed.weight": state_dict["model.embed_tokens.weight"],
            "final_norm": state_dict["model.norm.weight"],
            "lm_head.weight": state_dict.get(
                "lm_head.weight", state_dict["model.embed_tokens.weight"]
            ),
        }
        for i in range(cfg.num_layers):
            hf, ours = f"model.layers.{i}.", f"blocks.{i}."
            attn, mlp = hf + "self_attn.", hf + "mlp."
            own[ours + "qkv.weight"] = torch.cat(
                [state_dict[attn + p + "_proj.weight"] for p in ("q", "k", "v")]
            )
            if cfg.attention_bias:
                own[ours + "qkv.bias"] = torch.cat(
                    [state_dict[attn + p + "_proj.bias"] for p in ("q", "k", "v")]
                )
            own[ours + "o.weight"] = state_dict[attn + "o_proj.weight"]
            own[ours + "gate_up.weight"] = torch.cat(
                [state_dict[mlp + "gate_proj.weight"], state_dict[mlp + "up_proj.weight"]]
            )
            own[ours + "down.weight"] = state_dict[mlp + "down_proj.weight"]
            own[ours + "input_norm"] = state_dict[hf + "input_layernorm.weight"]
            own[ours + "post_attn_norm"] = state_dict[hf + "post_attention_layernorm.weight"]
            if cfg.family == "gemma3":
                own[ours + "pre_mlp_norm"] = state_dict[hf + "pre_feedforward_layernorm.weight"]
                own[ours + "post_mlp_norm"] = state_dict[hf + "post_feedforward_layernorm.weight"]
                own[ours + "q_norm"] = state_dict[attn + "q_norm.weight"]
                own[ours + "k_norm"] = state_dict[attn + "k_norm.weight"]
        self.load_state_dict(own, strict=True)

    def warm_up_invariance(self, max_rows: int) -> None:
        """Find, for forwards of up to `max_rows` tokens, how to split each matrix product so
        that its rows get the bits of a one-token forward (see `invariance.py`)."""
        for module in self.modules():
            if isinstance(module, BatchInvariantLinear):
                module.warm_up(max_rows)

    def setup_rope(self, max_len: int) -> None:
        cfg = self.cfg
        device = self.final_norm.device
        self.ropes["global"] = Rope(
            cfg.head_dim, cfg.rope_theta, max_len, cfg.rope_scaling_factor, device
        )
        self.ropes["local"] = Rope(cfg.head_dim, cfg.rope_local_base_freq, max_len, 1.0, device)

    def forward(
        self,
        token_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        new_mask: torch.Tensor,  # [T, S] bool, S >= T: new token i sees slot end - S + j
        cache: KVCache,
        return_logits: bool = True,
        capture: tuple[int, ...] = (),
        captured: list[torch.Tensor] | None = None,
    ) -> torch.Tensor | None:  # [T, V] float32
        """Next-token logits of the new tokens. With `capture`, the hidden state entering each
        listed layer (Hugging Face's `hidden_states[i]`, except that `num_layers` is the last
        layer's output before the final norm, where Hugging Face's is after it) is appended to
        `captured` as one `[T, len(capture), hidden]` tensor: what trained draft heads read, at no
        extra cost."""
        cfg = self.cfg
        num_new = token_ids.shape[0]
        write_at = cache.length
        end = write_at + num_new
        if num_new == 1 and self.batch_invariant and not kernel_applies(self.lm_head.weight):
            # Library products take another kernel for a lone row than for several, with other
            # rounding; a copy of the row keeps every forward on the multi-row kernel. (The
            # row-wise kernel rounds a lone row like any other.)
            token_ids = token_ids.repeat(2)
            positions = positions.repeat(2)
            new_mask = new_mask.repeat(2, 1)
        rows = token_ids.shape[0]
        x = self.embed(token_ids)
        if cfg.family == "gemma3":
            x = x * torch.tensor(cfg.hidden_size**0.5, dtype=x.dtype)
        device = x.device
        # Which cache slots each row may attend: all cached slots up to the last S, then those
        # (trailing cached ones, as of a tree being grown, and the new tokens) per new_mask.
        mask = torch.ones(rows, end, dtype=torch.bool, device=device)
        mask[:, end - new_mask.shape[1] : end] = new_mask
        mask_local = mask
        if cfg.sliding_window is not None and cfg.family == "gemma3":
            # Slot positions equal token positions for cached tokens; new ones use `positions`.
            key_pos = torch.arange(end, device=device)
            slot_pos = torch.cat([key_pos[:write_at], positions[:num_new]])
            mask_local = mask & (slot_pos[None, :] > positions[:, None] - cfg.sliding_window)
        # Computed once per forward rather than in every layer: masks (the additive form on first
        # use), rope tables.
        visible = Visibility(mask)
        visible_local = visible if mask_local is mask else Visibility(mask_local)
        rope_global = self.ropes["global"].at(positions, x.dtype)
        rope_local = self.ropes["local"].at(positions, x.dtype)
        states: dict[int, torch.Tensor] = {}
        for block in self.blocks:
            if block.layer in capture:
                states[block.layer] = x[:num_new]
            if block.sliding:
                x = block(x, rope_local, cache, write_at, num_new, visible_local)
            else:
                x = block(x, rope_global, cache, write_at, num_new, visible)
        cache.length = end
        if capture:
            states[cfg.num_layers] = x[:num_new]
            assert captured is not None
            captured.append(torch.stack([states[layer] for layer in capture], dim=1))
        if not return_logits:
            return None
        x = rms_norm(x, self.final_norm, cfg.rms_norm_eps, 1.0 if cfg.family == "gemma3" else 0.0)
        logits = self.lm_head(x).float()
        if cfg.final_logit_softcapping:
            cap = cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits[:num_new]
