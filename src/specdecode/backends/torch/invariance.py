"""Linear layers whose output rows do not depend on how many rows share the matrix product.

Greedy speculative decoding reproduces plain decoding token for token only if the target computes
a token's logits with the same bits in a one-token forward (decoding) as in a multi-token forward
(verification). CPU matrix-product libraries do not promise that: oneDNN picks its blocking of the
reduction from the number of rows, and which row counts agree depends on the CPU (seen: on an AMD
EPYC with AVX-512 BF16 every count from 2 up agrees in bfloat16; on an Intel Xeon without it only
2 and 3 do for some shapes).

The first choice is the C++ kernel of `kernels/rowwise_linear.cpp`, which sums every output in one
fixed order whatever the row count, so the question does not arise. (On a CPU with AMX, and with
`SPECDECODE_TILES=1`, bfloat16 rows take its tile path, for which each layer keeps a copy of its
weight in the tiles' layout.) Where it is unavailable (no AVX-512, no compiler, CUDA), nothing is
assumed: each layer measures, on this machine and at this thread count, which row counts give the
same bits per row as a two-row product (the shape a one-token forward is then padded to, see
`model.py`), and splits a product into chunks of such counts.

Forwards larger than `MAX_INVARIANT_ROWS` (prompt prefill) are not split: plain and speculative
decoding prefill the same way, so their bits agree without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.backends.torch import kernels

MAX_INVARIANT_ROWS = kernels.MAX_ROWS
# Largest piece tried when a row count itself does not agree; bigger pieces rarely help on a CPU.
MAX_PIECE_ROWS = 16
PROBE_OUTPUTS = 32768


# (out, in, bias, dtype, device, threads, rows) -> whether `rows`-row products agree. Shared by all
# layers of a shape: agreement depends on the shape and the library's choices, not the weights.
_AGREES: dict[tuple, bool] = {}
# The same key -> how `forward` splits that many rows.
_PIECES: dict[tuple, list[int]] = {}


def _probe(weight: torch.Tensor, bias: torch.Tensor | None, row_counts: list[int]) -> None:
    """Record, for each count, whether a product of that many rows matches two-row products.

    A different order of summation shows in a bfloat16 result only when it moves a value across
    a rounding boundary, which happens for a few outputs in ten thousand; so the probe compares at
    least `PROBE_OUTPUTS` outputs per row position, on rows of varied magnitude, to see it.
    """
    generator = torch.Generator().manual_seed(0)
    out_features, in_features = weight.shape
    agree = dict.fromkeys(row_counts, True)
    with torch.inference_mode():
        for _ in range(-(-PROBE_OUTPUTS // out_features)):
            inputs = torch.randn(max(row_counts), in_features, generator=generator)
            inputs *= 10 ** (2.5 * torch.rand(inputs.shape[0], 1, generator=generator) - 2)
            inputs = inputs.to(device=weight.device, dtype=weight.dtype)  # [rows, in]
            # Each row on its own, padded to two rows as a one-token forward is.
            references = [
                F.linear(inputs[i : i + 1].repeat(2, 1), weight, bias)[0]
                for i in range(inputs.shape[0])
            ]
            for rows in row_counts:
                if agree[rows]:
                    together = F.linear(inputs[:rows], weight, bias)  # [rows, out]
                    agree[rows] = all(torch.equal(together[i], references[i]) for i in range(rows))
    for rows, same in agree.items():
        _AGREES[_key(weight, bias, rows)] = same


def _key(weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> tuple:
    return (
        *weight.shape,
        bias is not None,
        weight.dtype,
        weight.device.type,
        torch.get_num_threads(),
        rows,
    )


def kernel_applies(weight: torch.Tensor) -> bool:
    """Whether products with `weight` run on the row-wise kernel (which compiles on first call)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and kernels.rowwise_linear() is not None
    )


def widen_for_prefill(weight: torch.Tensor) -> bool:
    """Whether large bfloat16 products (prefill) are faster in float32 on this machine.

    Without bfloat16 instructions (AVX-512 BF16 or AMX) oneDNN emulates them, about four times
    slower than a float32 product even counting the conversion of the weights.
    """
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and not {"avx512_bf16", "amx_bf16"} & kernels.cpu_flags()
    )


class BatchInvariantLinear(nn.Linear):
    """`nn.Linear` whose rows get the same bits whatever the number of rows of a product.

    With the row-wise kernel every count agrees; without it, products are split into pieces of
    row counts that match two-row products on this machine.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The weight in AMX tile layout, made on first use where the tiles are chosen (a second
        # copy of the weight: prefill's library products read the original), and the weight's
        # (storage, version) it was made from, so that a changed weight is packed again.
        self.tiled_weight: torch.Tensor | None = None
        self.tiled_from: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [R, in] -> [R, out]
        rows = x.shape[0]
        if x.dim() == 2 and rows <= MAX_INVARIANT_ROWS and kernel_applies(self.weight):
            rowwise = kernels.rowwise_linear()
            # bfloat16 rows stay bfloat16 where the CPU multiplies them natively (widening them
            # is exact, so the two paths differ only in how they sum).
            native = x.dtype == torch.bfloat16 and self.takes_bfloat16_rows()
            if native and kernels.tiles_chosen():
                tiles = kernels.rowwise_linear_tiles()
                out = tiles(x.contiguous(), self.weight_in_tiles(), self.out_features)
            else:
                out = rowwise((x if native else x.float()).contiguous(), self.weight)
            # out: [R, out] float32
            if self.bias is not None:
                out += self.bias
            return out.to(x.dtype)
        if rows > MAX_INVARIANT_ROWS and widen_for_prefill(self.weight):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        if x.dim() != 2 or rows > MAX_INVARIANT_ROWS or rows <= 2:
            return F.linear(x, self.weight, self.bias)
        key = _key(self.weight, self.bias, rows)
        pieces = _PIECES.get(key)
        if pieces is None:  # worked out once per shape and row count, not in every forward
            pieces = _PIECES[key] = self.pieces(rows)
        if len(pieces) == 1:
            return F.linear(x, self.weight, self.bias)
        out, start = [], 0
        for size in pieces:
            chunk = x[start : start + size]
            if size == 1:  # pad a lone row to the two-row shape, keep its result
                out.append(F.linear(chunk.repeat(2, 1), self.weight, self.bias)[:1])
            else:
                out.append(F.linear(chunk, self.weight, self.bias))
            start += size
        return torch.cat(out)

    def takes_bfloat16_rows(self) -> bool:
        """Whether bfloat16 rows meet this bfloat16 weight natively in the row-wise kernel."""
        return self.weight.dtype == torch.bfloat16 and kernels.takes_bfloat16_rows()

    def weight_in_tiles(self) -> torch.Tensor:
        """The weight packed for `kernels.rowwise_linear_tiles`, packed again if it changed."""
        source = (self.weight.data_ptr(), self.weight._version)
        if self.tiled_weight is None or self.tiled_from != source:
            self.tiled_weight = kernels.pack_for_tiles(self.weight.detach())
            self.tiled_from = source
        return self.tiled_weight

    def pieces(self, rows: int) -> list[int]:
        """Row counts, summing to `rows`, each of which agrees with two-row products (or is 1)."""
        if rows <= 2 or self.agrees(rows):
            return [rows]
        agreeing = [s for s in range(3, min(rows - 1, MAX_PIECE_ROWS) + 1) if self.agrees(s)]
        piece = max(agreeing, default=2)
        full, rest = divmod(rows, piece)
        return [piece] * full + (self.pieces(rest) if rest else [])

    def agrees(self, rows: int) -> bool:
        """Whether a `rows`-row product gives every row the bits of a two-row product."""
        key = _key(self.weight, self.bias, rows)
        if key not in _AGREES:
            _probe(self.weight, self.bias, [rows])
        return _AGREES[key]

    def warm_up(self, max_rows: int) -> None:
        """Probe every row count up to `max_rows` (or pack the weight for the tile kernel) now
        rather than during the first forwards."""
        if kernel_applies(self.weight):
            if self.takes_bfloat16_rows() and kernels.tiles_chosen():
                self.weight_in_tiles()
            return
        counts = list(range(3, min(max_rows, MAX_INVARIANT_ROWS) + 1))
        missing = [rows for rows in counts if _key(self.weight, self.bias, rows) not in _AGREES]
        if missing:
            _probe(self.weight, self.bias, missing)
