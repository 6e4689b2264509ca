"""What the one-attention-layer heads share (EAGLE-3's head, Kangaroo's adapter): their keys and
values by position, and rotary tables that grow with the positions asked for. Each head projects
its own inputs into a `Projected` and finishes its own layer around `HeadCache.attend`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specdecode.backends.torch.model import Rope, apply_rope


@dataclass
class Projected:
    """One step's attention inputs, rotated: queries, keys, values per head."""

    q: torch.Tensor  # [heads, T, D]
    k: torch.Tensor  # [kv_heads, T, D]
    v: torch.Tensor  # [kv_heads, T, D]


class GrowingRope:
    """Rotary tables for a head, built at first use on the device asked for and rebuilt longer
    when a position beyond them comes (a head does not know its context length)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim = head_dim
        self.theta = theta
        self._table: Rope | None = None

    def at(
        self, positions: torch.Tensor, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:  # cos, sin, each [T, D]
        needed = int(positions.max()) + 1 if positions.numel() else 1
        table = self._table
        if table is None or table.cos.shape[0] < needed or table.cos.device != device:
            length = max(needed, 4096)
            self._table = table = Rope(self.head_dim, self.theta, length, 1.0, device)
        return table.at(positions.to(device), dtype)


def project(
    x: torch.Tensor,  # [T, in] the layer's normed input
    layers: tuple[torch.nn.Linear, torch.nn.Linear, torch.nn.Linear],  # q, k, v projections
    heads: int,
    kv_heads: int,
    head_dim: int,
    rope: GrowingRope,
    positions: torch.Tensor,  # [T]
) -> Projected:
    """Queries, keys and values per head, rotated to their positions."""
    rows = x.shape[0]
    q_proj, k_proj, v_proj = layers
    q = q_proj(x).view(rows, heads, head_dim).transpose(0, 1)
    k = k_proj(x).view(rows, kv_heads, head_dim).transpose(0, 1)
    v = v_proj(x).view(rows, kv_heads, head_dim).transpose(0, 1)
    cos_sin = rope.at(positions, x.dtype, x.device)
    return Projected(apply_rope(q, cos_sin), apply_rope(k, cos_sin), v)


class HeadCache:
    """A one-layer head's keys and values by position: committed entries, then the drafts of the
    current step, which setting `length` back drops."""

    def __init__(
        self, num_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device
    ) -> None:
        shape = (num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def attend(
        self,
        projected: Projected,
        scale: float,
        visible: torch.Tensor | None = None,  # [T, S] bool over the last S slots; None = causal
    ) -> torch.Tensor:  # [heads, T, D]
        """Append T rows' keys and values and attend: each row sees every earlier cached slot,
        and among the last `S` slots (the new rows and, for a tree, the nodes cached before)
        those `visible` says."""
        rows = projected.q.shape[1]
        start, end = self.length, self.length + rows
        if end > self.k.shape[1]:  # a wide tree near the end of the context: grow
            extra = max(end - self.k.shape[1], 256)
            self.k = torch.cat(
                [self.k, self.k.new_zeros(self.k.shape[0], extra, self.k.shape[2])], 1
            )
            self.v = torch.cat(
                [self.v, self.v.new_zeros(self.v.shape[0], extra, self.v.shape[2])], 1
            )
        self.k[:, start:end] = projected.k
        self.v[:, start:end] = projected.v
        mask = torch.ones(rows, end, dtype=torch.bool, device=self.k.device)
        if visible is None:
            mask[:, start:end] = torch.ones(rows, rows, dtype=torch.bool).tril_()
        else:
            mask[:, end - visible.shape[1] :] = visible
        attended = F.scaled_dot_product_attention(
            projected.q,
            self.k[:, :end],
            self.v[:, :end],
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        self.length = end
        return attended
