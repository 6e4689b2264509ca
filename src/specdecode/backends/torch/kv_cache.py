"""A static KV cache: one preallocated buffer per model, indexed by position.

Rollback is a length change; a tree commit is one gather that moves the accepted path's rows down
to sit right after the committed prefix. Nothing is ever recomputed.
"""

from __future__ import annotations

import torch

from specdecode.models.config import TransformerConfig


class KVCache:
    """Preallocated keys and values for every layer, indexed by position (rollback is free)."""

    def __init__(
        self, cfg: TransformerConfig, max_len: int, dtype: torch.dtype, device: str | torch.device
    ) -> None:
        shape = (cfg.num_layers, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len

    def keep(self, start: int, offsets: torch.Tensor) -> None:
        """Move rows start + offsets[k] to start + k (offsets ascending), drop the rest."""
        src = start + offsets
        dst = start + torch.arange(offsets.shape[0], device=offsets.device)
        self.k[:, :, dst] = self.k[:, :, src]
        self.v[:, :, dst] = self.v[:, :, src]
        self.length = start + offsets.shape[0]
