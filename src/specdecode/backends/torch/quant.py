"""Weight-only int8 quantization for a model whose numerics need not be exact: the draft model.

A drafter's numbers only decide which tokens are proposed; the target checks every one, so a
quantized draft model changes speed, never output. On a CPU a small model's one-token forward is
bound by reading its weights, and int8 weights halve that traffic.

Each output channel of a linear layer gets its own scale (symmetric, max-abs / 127).
"""

from __future__ import annotations

import torch
from torch import nn

from specdecode.backends.torch import kernels


class Int8Linear(nn.Module):
    """`y = x @ (weight_int8 * scale).T + bias`, without materialising the float weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # [out, in]
        scale = weight.abs().amax(dim=1).clamp_min(1e-8) / 127.0  # [out]
        self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features)
        small = rows.shape[0] <= kernels.MAX_ROWS
        rowwise = kernels.rowwise_linear() if small and rows.device.type == "cpu" else None
        if rowwise is not None:
            # Decoding: weights widened in registers, one pass over a quarter of float32's bytes.
            out = (rowwise(rows.float().contiguous(), self.weight) * self.scale).to(rows.dtype)
        elif rows.device.type == "cpu":
            # Prefill: this many rows make the product compute-bound, and float32 matrix products
            # are the CPU's fastest; the widened weight is a temporary of one layer.
            widened = self.weight.float()  # [out, in]
            out = torch.nn.functional.linear(rows.float(), widened) * self.scale.float()
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
            setattr(model, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return model
