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

A forward may carry several sequences (`Rows`, one per sequence, each with its own KV cache): the
linear layers run once over all their rows, and each sequence's attention over its own cache
alone, so a sequence's logits have the bits of its forward alone (continuous batching, `serve/`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.backends.base import LayerPlan
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


@dataclass
class Rows:
    """One sequence's new tokens in a forward that may carry several sequences."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    new_mask: torch.Tensor  # [T, S] bool, S >= T: new token i sees slot end - S + j
    cache: KVCache  # this sequence's own
    captured: list[torch.Tensor] | None = None  # where the hidden states of `capture` go


@dataclass(frozen=True)
class Segment:
    """Where one sequence's rows sit in a forward, and what they may attend."""

    start: int  # first row in the forward
    rows: int  # rows in the forward (a lone token may be padded to two)
    num_new: int  # real tokens among them (the first ones)
    cache: KVCache
    write_at: int  # the cache slot of the first new token
    visible: Visibility  # for global-attention layers
    visible_local: Visibility  # for sliding-window layers (the same object without a window)


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
        x: torch.Tensor,  # [R, h]: every segment's rows
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin at the rows' positions
        segments: list[Segment],
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
        if len(segments) == 1:
            out = self._attend(q, k, v, segments[0], x.dtype)
        else:  # each sequence over its own cache: its bits are those of its forward alone
            out = torch.cat(
                [
                    self._attend(
                        q[:, seg.start : seg.start + seg.rows],
                        k[:, seg.start : seg.start + seg.rows],
                        v[:, seg.start : seg.start + seg.rows],
                        seg,
                        x.dtype,
                    )
                    for seg in segments
                ]
            )
        return self.o(out)

    def _attend(
        self,
        q: torch.Tensor,  # [H, R, D]: one sequence's rows
        k: torch.Tensor,  # [Hkv, R, D]
        v: torch.Tensor,  # [Hkv, R, D]
        seg: Segment,
        dtype: torch.dtype,
    ) -> torch.Tensor:  # [R, H*D]
        cfg = self.cfg
        heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        rows, cache, write_at, num_new = seg.rows, seg.cache, seg.write_at, seg.num_new
        visibility = seg.visible_local if self.sliding else seg.visible
        end = write_at + num_new
        cache.k[self.layer, :, write_at:end] = k[:, :num_new]
        cache.v[self.layer, :, write_at:end] = v[:, :num_new]
        keys = cache.k[self.layer, :, :end]  # [Hkv, L, D]
        values = cache.v[self.layer, :, :end]
        group = heads // kv_heads
        q = q.reshape(kv_heads, group * rows, d)  # queries of a kv group share its keys
        out = self._attention_per_row(q, keys, values, visibility.allowed)
        if out is not None:
            return out.to(dtype).view(heads, rows, d).transpose(0, 1).reshape(rows, heads * d)
        if rows > MAX_INVARIANT_ROWS and widen_for_prefill(keys):
            # Prefill on a CPU without bfloat16 arithmetic: float32 products are much faster.
            q, keys, values = q.float(), keys.float(), values.float()
        scores = torch.matmul(q, keys.transpose(1, 2)).float() * self.scale  # [Hkv, G*R, L]
        scores = scores.view(kv_heads, group, rows, end) + visibility.bias
        probs = torch.softmax(scores, dim=-1).to(values.dtype).view(kv_heads, group * rows, end)
        out = torch.matmul(probs, values).to(dtype)  # [Hkv, G*R, D]
        return out.view(heads, rows, d).transpose(0, 1).reshape(rows, heads * d)

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

    def forward(self, x, rope, segments: list[Segment], attention: bool = True, mlp: bool = True):
        """The block; a self-speculative draft may leave out its attention or its MLP (the
        residual stream passes on without that branch, and a skipped attention writes no KV)."""
        if self.pre_mlp_norm is None:  # Llama / Qwen2
            if attention:
                x = x + self.attention(self.norm(x, self.input_norm), rope, segments)
            if mlp:
                x = x + self.mlp(self.norm(x, self.post_attn_norm))
            return x
        if attention:
            attn = self.attention(self.norm(x, self.input_norm), rope, segments)
            x = x + self.norm(attn, self.post_attn_norm)
        if mlp:
            x = x + self.norm(self.mlp(self.norm(x, self.pre_mlp_norm)), self.post_mlp_norm)
        return x


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
        parts: Sequence[Rows],
        return_logits: bool = True,
        capture: tuple[int, ...] = (),
        plan: LayerPlan | None = None,
        return_hidden: bool = False,
    ) -> list[torch.Tensor | None]:  # per part: [T, V] float32, or [T, H] with return_hidden
        """Next-token logits of each part's new tokens, in one forward over all of them (each part
        appends to and attends to its own cache). With `plan`, only the layers and sublayers it
        keeps run (a self-speculative draft; capture is then not offered). With `capture`, the
        hidden state entering each listed layer (Hugging Face's `hidden_states[i]`, except that
        `num_layers` is the last layer's output before the final norm, where Hugging Face's is
        after it) is appended to each part's `captured` as one `[T, len(capture), hidden]`
        tensor: what trained draft heads read, at no extra cost. With `return_hidden`, each
        part's states leaving the last layer run, before the final norm, instead of logits."""
        cfg = self.cfg
        # Library products take another kernel for a lone row than for several, with other
        # rounding; a copy of the row keeps every forward on the multi-row kernel. (The row-wise
        # kernel rounds a lone row like any other.)
        pad_lone_row = (
            len(parts) == 1
            and parts[0].token_ids.shape[0] == 1
            and self.batch_invariant
            and not kernel_applies(self.lm_head.weight)
        )
        segments: list[Segment] = []
        all_ids, all_positions = [], []
        for part in parts:
            segment = self._segment(part, sum(seg.rows for seg in segments), pad_lone_row)
            segments.append(segment)
            copies = 2 if pad_lone_row else 1
            all_ids.append(part.token_ids.repeat(copies))
            all_positions.append(part.positions.repeat(copies))
        token_ids = torch.cat(all_ids) if len(parts) > 1 else all_ids[0]
        positions = torch.cat(all_positions) if len(parts) > 1 else all_positions[0]
        x = self.embed(token_ids)
        if cfg.family == "gemma3":
            x = x * torch.tensor(cfg.hidden_size**0.5, dtype=x.dtype)
        # Rope tables are looked up once per forward rather than in every layer.
        rope_global = self.ropes["global"].at(positions, x.dtype)
        rope_local = self.ropes["local"].at(positions, x.dtype)
        states: dict[int, torch.Tensor] = {}
        for block in self.blocks:
            if plan is not None and plan.exit_layer is not None and block.layer >= plan.exit_layer:
                break
            if block.layer in capture:
                states[block.layer] = x
            rope = rope_local if block.sliding else rope_global
            if plan is None:
                x = block(x, rope, segments)
            else:
                attention = block.layer not in plan.skip_attention
                x = block(x, rope, segments, attention, block.layer not in plan.skip_mlp)
        for part, seg in zip(parts, segments, strict=True):
            part.cache.length = seg.write_at + seg.num_new
        if capture:
            assert plan is None, "a partial forward captures no hidden states"
            states[cfg.num_layers] = x
            for part, seg in zip(parts, segments, strict=True):
                assert part.captured is not None
                rows = slice(seg.start, seg.start + seg.num_new)
                part.captured.append(torch.stack([states[layer][rows] for layer in capture], 1))
        if return_hidden:
            return [x[seg.start : seg.start + seg.num_new] for seg in segments]
        if not return_logits:
            return [None] * len(parts)
        x = rms_norm(x, self.final_norm, cfg.rms_norm_eps, 1.0 if cfg.family == "gemma3" else 0.0)
        logits = self.lm_head(x).float()
        if cfg.final_logit_softcapping:
            cap = cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return [logits[seg.start : seg.start + seg.num_new] for seg in segments]

    def forward_block(self, layer: int, x: torch.Tensor, part: Rows) -> torch.Tensor:
        """Block `layer` alone over the states `x` [T, h] of `part`'s rows, whose keys and values
        go after its cache without changing the cache's length."""
        segment = self._segment(part, 0, pad_lone_row=False)
        block = self.blocks[layer]
        rope = self.ropes["local" if block.sliding else "global"].at(part.positions, x.dtype)
        return block(x, rope, [segment])

    def _segment(self, part: Rows, start: int, pad_lone_row: bool) -> Segment:
        """Where `part` sits in the forward and which cache slots each of its rows may attend:
        all cached slots up to the last S, then those (trailing cached ones, as of a tree being
        grown, and the new tokens) per its new_mask."""
        cfg = self.cfg
        num_new = part.token_ids.shape[0]
        write_at = part.cache.length
        end = write_at + num_new
        new_mask = part.new_mask.repeat(2, 1) if pad_lone_row else part.new_mask
        rows = new_mask.shape[0]
        device = new_mask.device
        mask = torch.ones(rows, end, dtype=torch.bool, device=device)
        mask[:, end - new_mask.shape[1] : end] = new_mask
        visible = Visibility(mask)
        visible_local = visible
        if cfg.sliding_window is not None and cfg.family == "gemma3":
            # Slot positions equal token positions for cached tokens; new ones use `positions`.
            positions = part.positions.repeat(rows // num_new)
            key_pos = torch.arange(end, device=device)
            slot_pos = torch.cat([key_pos[:write_at], part.positions])
            mask_local = mask & (slot_pos[None, :] > positions[:, None] - cfg.sliding_window)
            visible_local = Visibility(mask_local)
        return Segment(start, rows, num_new, part.cache, write_at, visible, visible_local)
