"""Greedy answers to many prompts at once, with the target's features captured on the way.

Self-distillation needs thousands of answers. One at a time, the 1.5B target writes about ten
tokens a second on two cores: each step reads every weight for one token. Here `batch` sequences
share each step (continuous batching: a finished sequence's row takes the next prompt at once), so
the weights are read once for all of them, and the step writes the features the head trains on
(the hidden states entering its layers) and the target's argmax, so no second pass over the
answers is needed.

Not the exact kernels: the products here are the library's, batched, whose rounding differs from
the engine's in the last bits, so an answer can part from `generate`'s at a near tie. That is
harmless for training data (the head learns the target's habits, not one rounding of them), and
the features are still the target's own, computed by its weights on its own text.

Llama / Qwen2 family (the heads' targets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from specdecode.backends.torch.model import Block, Transformer, apply_rope, rms_norm
from specdecode.errors import SpecDecodeError


@dataclass
class Answer:
    """One prompt's greedy answer and the features of every token fed to the target."""

    prompt: list[int]
    answer: list[int]  # generated ids, ending with a stop token unless cut by the limit
    features: torch.Tensor  # [P + A - 1, layers, H] bfloat16: hidden states entering `layers`
    labels: torch.Tensor  # [P + A - 1] int64: the target's argmax after each token fed (at
    # prompt positions but the last: the next prompt token, a placeholder never trained)


@dataclass
class _Row:
    """A sequence being generated in one row of the batch."""

    index: int  # which prompt
    prompt: list[int]
    answer: list[int] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)  # [n, layers, H] pieces
    length: int = 0  # tokens in this row's cache


class _BatchCache:
    """Keys and values of `batch` independent sequences, each row its own length."""

    def __init__(self, model: Transformer, batch: int, length: int) -> None:
        cfg = model.cfg
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        dtype = model.final_norm.dtype
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)


def _rope(model: Transformer, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, ...]:
    rope = model.ropes["global"]  # [B, T] -> each [B, 1, T, D], broadcast over heads
    return rope.cos[positions].to(dtype)[:, None], rope.sin[positions].to(dtype)[:, None]


def _layer(
    block: Block,
    x: torch.Tensor,  # [B, T, H]
    rope: tuple[torch.Tensor, ...],
    cache: _BatchCache,
    rows: slice,  # the cache rows of the batch
    slots: torch.Tensor,  # [B, T] cache slots the new tokens go to
    allowed: torch.Tensor,  # [B, T, S] bool: which slots each new token sees
) -> torch.Tensor:
    cfg = block.cfg
    batch, count, _ = x.shape
    heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    qkv = F.linear(rms_norm(x, block.input_norm, eps, 0.0), block.qkv.weight, block.qkv.bias)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = apply_rope(q.view(batch, count, heads, d).transpose(1, 2), rope)  # [B, Hq, T, D]
    k = apply_rope(k.view(batch, count, kv_heads, d).transpose(1, 2), rope)  # [B, Hkv, T, D]
    v = v.view(batch, count, kv_heads, d).transpose(1, 2)
    span = allowed.shape[-1]
    keys = cache.k[block.layer, rows]  # [B, Hkv, L, D], a view
    values = cache.v[block.layer, rows]
    batch_index = torch.arange(batch)[:, None].expand(-1, count)  # [B, T]
    keys[batch_index, :, slots] = k.transpose(1, 2)  # [B, T, Hkv, D] into each row's slots
    values[batch_index, :, slots] = v.transpose(1, 2)
    # Plain products rather than the library's fused attention, which is slow on CPU for few
    # queries per row: a query group shares its key head.
    group = heads // kv_heads
    q = q.reshape(batch, kv_heads, group * count, d)
    scores = torch.matmul(q, keys[:, :, :span].transpose(2, 3)).float() * block.scale
    scores = scores.view(batch, kv_heads, group, count, span)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype).view(batch, kv_heads, -1, span)
    out = torch.matmul(probs, values[:, :, :span]).view(batch, heads, count, d)
    x = x + F.linear(out.transpose(1, 2).reshape(batch, count, heads * d), block.o.weight)
    gate, up = F.linear(rms_norm(x, block.post_attn_norm, eps, 0.0), block.gate_up.weight).chunk(
        2, dim=-1
    )
    return x + F.linear(F.silu(gate) * up, block.down.weight)


def _forward(
    model: Transformer,
    token_ids: torch.Tensor,  # [B, T]
    cache: _BatchCache,
    rows: slice,  # the cache rows of the batch
    starts: torch.Tensor,  # [B] each row's cached length: the new tokens follow it
    layers: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:  # argmax after the last token [B], features [B, T, n, H]
    batch, count = token_ids.shape
    slots = starts[:, None] + torch.arange(count)  # [B, T]
    span = int(slots.max()) + 1
    allowed = torch.arange(span)[None, None, :] <= slots[:, :, None]  # [B, T, S]: causal
    x = model.embed(token_ids)
    rope = _rope(model, slots, x.dtype)
    captured: dict[int, torch.Tensor] = {}
    for block in model.blocks:
        if block.layer in layers:
            captured[block.layer] = x
        x = _layer(block, x, rope, cache, rows, slots, allowed)
    captured[model.cfg.num_layers] = x
    last = rms_norm(x[:, -1], model.final_norm, model.cfg.rms_norm_eps, 0.0)
    argmax = F.linear(last, model.lm_head.weight).float().argmax(-1)
    features = torch.stack([captured[layer] for layer in layers], dim=2)
    return argmax, features.to(torch.bfloat16)


def generate_answers(
    model: Transformer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    stop_ids: frozenset[int],
    layers: tuple[int, ...],
    batch: int = 32,
    on_answer: Callable[[int, Answer], None] | None = None,
) -> list[Answer]:
    """Greedy answers to `prompts`, `batch` at a time; `on_answer(i, answer)` is called as each
    finishes (to save it), in the order they finish."""
    if model.cfg.family != "llama":
        raise SpecDecodeError(
            "self-distillation is written for Llama / Qwen2 targets: pass --data FILES for "
            f"{model.cfg.family}"
        )
    longest = max(len(p) for p in prompts) + max_new_tokens
    batch = max(1, min(batch, len(prompts)))
    cache = _BatchCache(model, batch, longest)
    if longest > model.ropes["global"].cos.shape[0]:
        raise SpecDecodeError(f"the model's rotary tables are shorter than {longest} positions")
    answers: list[Answer | None] = [None] * len(prompts)
    queue = list(range(len(prompts)))[::-1]
    slots: list[_Row | None] = [None] * batch
    pending = torch.zeros(batch, dtype=torch.long)  # each row's next token to feed

    def finish(row: _Row) -> None:
        fed = torch.cat(row.features)[: len(row.prompt) + len(row.answer) - 1]
        labels = torch.tensor(row.prompt[1:] + row.answer, dtype=torch.long)
        answer = Answer(row.prompt, row.answer, fed, labels)
        answers[row.index] = answer
        if on_answer is not None:
            on_answer(row.index, answer)

    def start(slot: int) -> None:
        index = queue.pop()
        row = _Row(index, list(prompts[index]))
        ids = torch.tensor([row.prompt], dtype=torch.long)
        argmax, features = _forward(
            model, ids, cache, slice(slot, slot + 1), torch.tensor([0]), layers
        )
        row.features.append(features[0])
        row.length = len(row.prompt)
        slots[slot] = row
        accept(slot, int(argmax[0]))

    def accept(slot: int, token: int) -> None:
        row = slots[slot]
        assert row is not None
        row.answer.append(token)
        if token in stop_ids or len(row.answer) >= max_new_tokens:
            finish(row)
            slots[slot] = None
        else:
            pending[slot] = token

    with torch.inference_mode():
        while queue or any(slots):
            for slot in range(batch):
                while slots[slot] is None and queue:
                    start(slot)
            if not any(slots):
                continue
            # Every row steps, an idle one (the queue ran dry) on a placeholder at its slot 0:
            # whole-batch views of the cache cost less than gathering the live rows.
            starts = torch.tensor([row.length if row else 0 for row in slots])
            argmax, features = _forward(model, pending[:, None], cache, slice(None), starts, layers)
            for slot, row in enumerate(slots):
                if row is None:
                    continue
                row.features.append(features[slot])
                row.length += 1
                accept(slot, int(argmax[slot]))
    return [a for a in answers if a is not None]
