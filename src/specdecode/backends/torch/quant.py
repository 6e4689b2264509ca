"""Weight-only int8 quantization for a model whose numerics need not be exact: the draft model.

A drafter's numbers only decide which tokens are proposed; the target checks every one, so a
quantized draft model changes speed, never output. On a CPU a small model's one-token forward is
bound by reading its weights, and int8 weights halve that traffic.

Each output channel of a linear layer gets its own scale (symmetric, max-abs / 127). Where the
CPU has integer dot products (AVX-512 VNNI), the rows are rounded to int8 too, each on its own
scale, and multiplied in bytes (`kernels.rowwise_linear_int8`). On 2 cores of an AMD EPYC that
took the 0.5B model's forward of 1 / 8 / 16 tokens from 53 / 95 / 157 ms (float rows, weights
widened in registers) to 36 / 63 / 85 ms, and its prefill of 600 tokens from 3.2 s to 1.35 s;
teacher-forced along the 1.5B model's greedy output on six code-editing prompts, its next-token
argmax agreed with the target's at 96.6% of positions, against 96.7% with float rows.
"""

from __future__ import annotations

import torch
from torch import nn

from specdecode.backends.torch import kernels


class Int8Linear(nn.Module):
    """`y = x @ (weight_int8 * scale).T + bias`, without materialising the float weight."""

    def __init__(
        self,
        weight: torch.Tensor,  # [out, in] int8
        scale: torch.Tensor,  # [out] float32
        bias: torch.Tensor | None = None,  # [out]
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        # float32 whatever the model's dtype: a bfloat16 scale would be off by up to 0.4%.
        self.register_buffer("scale", scale)
        # Each weight row's sum, which the byte kernel needs to undo the shift of its rows.
        self.register_buffer("row_sums", weight.sum(dim=1, dtype=torch.int32))
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight = linear.weight.detach().float()  # [out, in]
        scale = weight.abs().amax(dim=1).clamp_min(1e-8) / 127.0  # [out]
        levels = torch.round(weight / scale[:, None]).to(torch.int8)
        return cls(levels, scale, None if linear.bias is None else linear.bias.detach())

    def select_outputs(self, ids: torch.Tensor) -> Int8Linear:
        """The layer for outputs `ids` only, in that order."""
        bias = None if self.bias is None else self.bias[ids]
        return Int8Linear(self.weight[ids].contiguous(), self.scale[ids].contiguous(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features)
        on_cpu = rows.device.type == "cpu"
        small = rows.shape[0] <= kernels.MAX_ROWS and on_cpu
        in_bytes = kernels.rowwise_linear_int8() if on_cpu else None
        rowwise = kernels.rowwise_linear() if small and in_bytes is None else None
        if in_bytes is not None:
            # Prefill too, in chunks whose rows stay in cache while each weight tile meets them:
            # integer products are several times the float ones' speed.
            scales = self.scale.float()
            chunks = rows.float().split(kernels.MAX_ROWS)
            out = torch.cat(
                [in_bytes(c.contiguous(), self.weight, self.row_sums, scales) for c in chunks]
            )
            out = out.to(rows.dtype)
        elif rowwise is not None:
            # Decoding: weights widened in registers, one pass over a quarter of float32's bytes.
            out = (rowwise(rows.float().contiguous(), self.weight) * self.scale).to(rows.dtype)
        elif on_cpu:
            # Prefill: this many rows make the product compute-bound, and float32 matrix products
            # are the CPU's fastest; the widened weight is a temporary of one layer.
            widened = self.weight.float()  # [out, in]
            out = torch.nn.functional.linear(rows.float(), widened) * self.scale
            out = out.to(rows.dtype)
        elif rows.dtype != torch.float32:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scale.to(rows.dtype))
        else:  # the fused kernel takes no float32 input on CUDA
            out = (rows @ self.weight.to(rows.dtype).T) * self.scale.to(rows.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` in `model` by an `Int8Linear`, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear.from_linear(child))
        else:
            quantize_int8(child)
    return model


class PartialHead(nn.Module):
    """A draft model's output layer that scores part of the vocabulary: a fixed set of tokens
    and every token the model has been fed (the prompt's, and the output's so far); every other
    token gets -inf, so it is never drafted (a model with final logit soft-capping turns -inf
    into its lowest logit, -cap: practically never).

    Why: the output layer of a small model with a large vocabulary is a large share of the bytes
    its forward reads (the 0.5B's is 136 of its 494 MB in int8), and tokens outside the common
    ones and the prompt are rarely what the target says next. Lossless like any draft: the
    target checks what is proposed, and a sampling verifier gets the draft's distribution as it
    was sampled (zero outside the scored tokens).
    """

    def __init__(self, head: Int8Linear | nn.Linear, always: torch.Tensor) -> None:
        super().__init__()
        self.head = head
        always = torch.unique(always.long())
        self.always = always[(always >= 0) & (always < head.out_features)]
        self.forget()

    def forget(self) -> None:
        """Back to the fixed set (a new sequence: what one prompt adds does not carry over)."""
        self._select(self.always)

    def include(self, token_ids: torch.Tensor) -> None:
        """Score `token_ids` too, from now on (tokens fed to the model: a prompt's identifiers are
        what an answer repeats). Rebuilds the scored part only when one is new."""
        token_ids = token_ids.long().flatten().cpu()
        token_ids = token_ids[(token_ids >= 0) & (token_ids < self.head.out_features)]
        new = token_ids[~torch.isin(token_ids, self.ids)]
        if new.numel():
            self._select(torch.unique(torch.cat([self.ids, new])))

    def _select(self, ids: torch.Tensor) -> None:
        self.ids = ids  # sorted
        if isinstance(self.head, Int8Linear):
            self.part = self.head.select_outputs(ids)
        else:
            self.part = nn.Linear(self.head.in_features, len(ids), bias=False)
            self.part.weight = nn.Parameter(self.head.weight[ids], requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., vocab]
        scores = self.part(x)
        out = scores.new_full((*x.shape[:-1], self.head.out_features), float("-inf"))
        out[..., self.ids] = scores
        return out
