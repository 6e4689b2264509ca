"""The `llamacpp` backend: a GGUF model, quantized as shipped, through llama.cpp's low-level API.

On a CPU, llama.cpp's quantized kernels decode several times faster than PyTorch in bfloat16, so
this is the backend that makes speculation pay on CPUs. It implements the three primitives of
`Backend` over llama.cpp's KV cache, which is addressed by (sequence id, position) rather than by
row:

- A sequence's committed chain lives in a sequence id of its own at positions 0..n-1.
- Every slot beyond it (a tree node) gets its own sequence id, and each cache cell that slot may
  attend to (the chain, and the slot's ancestors) is tagged with that id too. llama.cpp masks a
  query token to the cells that carry its first sequence id and sit at a position no later than
  its own, so tagging *is* the tree mask, and one `llama_decode` verifies a whole tree.
- Tokens decoded in the same batch as their ancestors are listed under their descendants' ids as
  well, which is how a batch holds a tree (llama.cpp requires every sequence to cover consecutive
  positions, so node positions must be depths, as trees have them).
- `keep()` tags the accepted path with the chain's id and drops every node's id. Nothing is ever
  recomputed; rollback is bookkeeping.
- `fork()` gives another sequence in the same cache, and `forward_trees` verifies several
  sequences' trees in one `llama_decode` (continuous batching in `specdecode serve`).

The context is created with a unified KV buffer (`kv_unified`), without which cells could not be
shared between sequences; cells are given back by compaction only (`_Context` says why).
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import importlib.util
import os
import sys
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from specdecode.backends import llamacpp_matched
from specdecode.backends.base import Backend
from specdecode.errors import SpecDecodeError

if TYPE_CHECKING:
    from specdecode.tree import DraftTree

#: The compiler flags that keep llama.cpp's AMX kernels out of a build (x86-64; see `amx_error`).
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
INSTALL_HINT = (
    f'CFLAGS="{NO_AMX_FLAGS}" CXXFLAGS="{NO_AMX_FLAGS}" '
    'pip install --no-cache-dir "specdecode[llamacpp]" '
    "(builds llama.cpp from source, about 9 minutes)"
)
#: Set to 1 to run a llama.cpp built with AMX kernels anyway, on machines where they work.
ALLOW_AMX = "SPECDECODE_LLAMACPP_AMX"

#: llama.cpp's own limit on sequence ids (LLAMA_MAX_SEQ): one per sequence's committed chain and
#: per tree node held, two for the discarded and scratch cells.
MAX_SEQUENCES = 256
BATCH_SIZE = 512
#: KV cells beyond every sequence's full context, for the discarded ones (see _Context).
SPARE_CELLS = 1024
#: Copying a live cell in a compaction costs what this many rows' attention stepping over one
#: discarded cell does (the 1.5B on 2 EPYC cores: 15 us a cell against 0.24 us per row per cell;
#: both grow with the layers and heads).
COMPACTION_PAYBACK = 64
#: The repacked weights' matrix-matrix kernel takes rows in groups of this many, with another
#: summation order than the matrix-vector kernel that the rest of the rows (or a single token) take.
GEMM_ROWS = 4
#: llama.cpp's ggml type ids for the KV cache.
_GGML_TYPE_F16 = 1
_GGML_TYPE_BF16 = 30


@dataclass(frozen=True)
class KernelPlan:
    """How a LlamaCppBackend runs llama.cpp's kernels (LlamaCppBackend's docstring says why); the
    defaults are llama.cpp's own."""

    cost_name: str  # in the cost curve's cache key
    exact: bool = False  # a token's logits do not depend on the batch it is decoded in
    flash_attention: bool = False
    kv_types: tuple[int, int] | None = None  # ggml types of K and V; None: llama.cpp's default
    piece_rows: int | None = None  # a forward returning logits is decoded in pieces this wide
    row_multiple: int = 1  # every batch is padded with scratch rows to a multiple of this
    tiled_off: bool = False  # needs llama.cpp's tiled kernel (GGML_CPU_TILED_MM) off
    own_kernels: bool = False  # needs specdecode's kernels in place of llama.cpp's

    @property
    def scratch_rows(self) -> bool:
        """Whether batches are padded, and so need a sequence of their own for the padding."""
        return self.row_multiple > 1

    @property
    def reaches_tiled_kernel(self) -> bool:
        """Whether a forward may multiply enough rows at once for llama.cpp's tiled kernel."""
        return self.piece_rows is None or self.piece_rows >= TILED_MIN_ROWS


#: The ways to run llama.cpp's kernels: three exact, and llama.cpp's own.
KERNEL_PLANS: dict[str, KernelPlan] = {
    # Whole batches: Q4_K and Q6_K weights only (llamacpp_matched.COVERED_TYPES).
    "matched": KernelPlan(
        "exact-matched",
        exact=True,
        flash_attention=True,
        kv_types=(_GGML_TYPE_F16, _GGML_TYPE_BF16),
        own_kernels=True,
    ),
    "narrow": KernelPlan(
        "exact-narrow",
        exact=True,
        flash_attention=True,
        kv_types=(_GGML_TYPE_F16, _GGML_TYPE_BF16),
        piece_rows=GEMM_ROWS - 1,
    ),
    # Pieces stay below 64 rows, where flash attention starts tiling queries (GGML_FA_TILE_Q)
    # with another summation order. ("exact" was their name when they were the only exact ones.)
    "wide": KernelPlan(
        "exact",
        exact=True,
        flash_attention=True,
        piece_rows=60,
        row_multiple=GEMM_ROWS,
        tiled_off=True,
    ),
    "stock": KernelPlan("stock"),
}
KERNELS = tuple(KERNEL_PLANS)

_TILED_SWITCH = "GGML_CPU_TILED_MM"
#: Unrepacked K-quant weights take llama.cpp's tiled kernel from this many rows on.
TILED_MIN_ROWS = 8
_log_callback = None  # kept referenced: llama.cpp calls it for the life of the process
# llama.cpp reads the tiled kernel's switch once per process, at its first matrix product. Its
# value when import_llama_cpp first ran stands in for that moment (reserve_kernels leaves the
# switch alone once other code has imported llama_cpp: a model may have run already).
_imported = False
_tiled_switch_at_import: str | None = None
_tiled_switch_set_here = False  # by reserve_kernels, not by the user


def _silent(level: int, text: bytes, user_data) -> None:
    # llama.cpp logs every tensor it loads, and its errors come back as return codes that this
    # backend turns into one-line messages saying what to do.
    return None


def import_llama_cpp():
    """The `llama_cpp` module (with llama.cpp's own logging off), or one line saying how to
    install it."""
    global _imported, _tiled_switch_at_import, _log_callback
    try:
        import llama_cpp
    except ImportError:
        raise SpecDecodeError(
            f"the llamacpp backend needs llama-cpp-python: {INSTALL_HINT}"
        ) from None
    problem = amx_error(llama_cpp.llama_print_system_info().decode(errors="replace"), os.environ)
    if problem:
        raise SpecDecodeError(problem)
    if _log_callback is None:
        _log_callback = llama_cpp.llama_log_callback(_silent)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    if not _imported:
        _imported = True
        _tiled_switch_at_import = os.environ.get(_TILED_SWITCH)
    return llama_cpp


def amx_error(system_info: str, environ: dict[str, str] | os._Environ) -> str | None:
    """Why this llama.cpp build must not run, or None. A build on a machine whose CPU reports
    Intel AMX compiles llama.cpp's AMX matrix kernels in (`-march=native`), and on virtual
    machines of that kind they die with a general-protection fault at their first tile
    instruction (llama.cpp issue #20824; seen on this project's Sapphire Rapids machines): a
    crash that takes the process, and any half-written benchmark record, with it."""
    if "AMX_INT8 = 1" not in system_info or environ.get(ALLOW_AMX) == "1":
        return None
    return (
        "llama-cpp-python was built with llama.cpp's AMX kernels, which crash on many virtual "
        f'machines: rebuild it without them: CFLAGS="{NO_AMX_FLAGS}" CXXFLAGS="{NO_AMX_FLAGS}" '
        "pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python "
        f"(or set {ALLOW_AMX}=1 where they work)"
    )


def require_llama_cpp() -> None:
    """One line saying how to install llama-cpp-python where it is missing; it is not imported
    here, as llama.cpp must not start before reserve_kernels."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise SpecDecodeError(f"the llamacpp backend needs llama-cpp-python: {INSTALL_HINT}")


def reserve_kernels(kernels: Sequence[str]) -> None:
    """Prepare this process for every llama.cpp kernel it will run; call it before any llama.cpp
    model loads. The wide kernels need llama.cpp's tiled kernel off, which llama.cpp reads once,
    at its start; otherwise it stays on, as llama.cpp has it by default (it speeds up the prefill
    of a long prompt). Every llama.cpp model in such a process runs without the tiled kernel
    (programs it starts get the user's environment: `user_environment`). The matched kernels put
    specdecode's Q4_K matrix-vector kernel and Q6_K dot product in place of llama.cpp's, for every
    model of the process (llamacpp_matched); they are exact with the tiled kernel on or off."""
    for name in kernels:
        if name not in KERNEL_PLANS:
            raise SpecDecodeError(
                f"unknown llama.cpp kernels {name!r}; choose one of: {', '.join(KERNELS)}"
            )
    plans = [KERNEL_PLANS[name] for name in kernels]
    starting = not _imported and "llama_cpp" not in sys.modules
    global _tiled_switch_set_here
    if any(plan.tiled_off for plan in plans) and starting and _TILED_SWITCH not in os.environ:
        os.environ[_TILED_SWITCH] = "0"
        _tiled_switch_set_here = True
    if any(plan.own_kernels for plan in plans) and not llamacpp_matched.loaded():
        if not starting:
            raise SpecDecodeError(
                "the matched kernels must be in place before llama.cpp starts, and this process "
                "has started it: run them in a process of their own, or use --backend "
                "llamacpp-narrow"
            )
        try:
            llamacpp_matched.load()
        except RuntimeError as error:
            raise SpecDecodeError(
                f"the matched llama.cpp kernels cannot run here: {error}; use --backend "
                "llamacpp-narrow"
            ) from None


def user_environment() -> dict[str, str]:
    """The environment for another llama.cpp program (llama-server): this process's, without the
    switch that reserve_kernels set for specdecode's kernels, so that it runs as users run it."""
    environment = dict(os.environ)
    if _tiled_switch_set_here:
        environment.pop(_TILED_SWITCH, None)
    return environment


def tiled_kernel_off() -> bool:
    """Whether the llama.cpp of this process runs (or, before it starts, will run) without its
    tiled kernel (see reserve_kernels)."""
    switch = _tiled_switch_at_import if _imported else os.environ.get(_TILED_SWITCH)
    return switch == "0"


def uncovered_weights(path: Path) -> str | None:
    """What in a GGUF file keeps the matched kernels from being exact for it (weights of a type
    they do not cover), or None."""
    from specdecode.models.gguf_loader import open_reader

    reader = open_reader(path)
    names = {tensor.name for tensor in reader.tensors}
    # The token embedding is only looked up, unless the output projection is tied to it.
    looked_up = {"token_embd.weight"} if "output.weight" in names else set()
    multiplied = [t for t in reader.tensors if len(t.shape) > 1 and t.name not in looked_up]
    others = sorted({t.tensor_type.name for t in multiplied} - set(llamacpp_matched.COVERED_TYPES))
    if others:
        return f"{path.name} has {', '.join(others)} weights"
    # gguf lists a tensor's shape innermost first: shape[1] counts the output rows
    group = llamacpp_matched.Q4_K_ROW_GROUP
    ungrouped = [t.name for t in multiplied if t.tensor_type.name == "Q4_K" and t.shape[1] % group]
    if ungrouped:
        return f"{path.name} has Q4_K weights in rows not grouped by {group} ({ungrouped[0]})"
    return None


def best_exact_kernels(path: Path) -> tuple[str, str | None]:
    """The fastest exact kernels for a GGUF file in this process: "matched" where they can run,
    else "narrow", with the reason they cannot."""
    reason = llamacpp_matched.why_unavailable() or uncovered_weights(path)
    if reason is None and not llamacpp_matched.loaded():
        if _imported or "llama_cpp" in sys.modules:
            reason = "this process started llama.cpp without specdecode's kernels"
        else:
            try:  # built and put in place now, so that a failure falls back to narrow
                llamacpp_matched.load()
            except RuntimeError as error:
                reason = str(error)
    return ("narrow", reason) if reason else ("matched", None)


@dataclass
class _Slot:
    """A cache slot beyond the committed chain: one tree node's cell."""

    position: int
    sequence: int  # the sequence id that this slot's query reads, tagged on all it may see


class _Context:
    """A llama.cpp model and context, and the KV cache that a backend and its forks share.

    Exactness needs each sequence's cells in the cache in position order, as plain decoding
    leaves them: flash attention sums a query's visible cells in cache order. llama.cpp puts new
    tokens in the first free cells after a head that moves back to any cell freed before it, so a
    cell freed below a sequence's last one (a rejected draft, a dropped tree node, a finished
    request) would take a later token of some sequence out of its order. So between compactions
    the cache only grows: a cell that would be freed goes to the discard sequence, which no query
    reads, and compaction gives them all back at once: every sequence's committed chain saved, the
    cache cleared, the chains loaded back, each in consecutive cells, bytes unchanged. It runs
    before a forward when no tree node is held (between steps) and the forward would not fit, or
    when the forwards since the last compaction have spent more stepping over discarded cells
    than copying the live ones would cost (every query's attention steps over every cell:
    `COMPACTION_PAYBACK`), a rent-or-buy rule: a long prompt's prefill after discards compacts
    first, a batch of short steps once its discarded cells have cost a compaction.
    """

    def __init__(self, lib, model, context, cells: int, sequence_ids: int, scratch: bool) -> None:
        self.lib, self.model, self.context = lib, model, context
        self.memory = lib.llama_get_memory(context)
        self.cells = cells
        self.used = 0  # cells holding a token, live or discarded, since the last compaction
        self.stepped_over = 0  # rows x discarded cells of the forwards since then
        self.batch = lib.llama_batch_init(BATCH_SIZE, 0, sequence_ids)
        self.free_ids = list(range(sequence_ids - 1, -1, -1))  # pop() gives the lowest
        self.discard_id = self.free_ids.pop(0)
        # The scratch rows' own sequence: no query reads it, so they touch no real token.
        self.scratch_id = self.free_ids.pop(0) if scratch else None
        self.members: weakref.WeakSet[LlamaCppBackend] = weakref.WeakSet()

    def __del__(self) -> None:
        lib = self.lib
        if getattr(self, "batch", None) is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "context", None):
            lib.llama_free(self.context)
            self.context = None
        if getattr(self, "model", None):
            lib.llama_model_free(self.model)
            self.model = None

    def take_id(self) -> int:
        if not self.free_ids:
            raise SpecDecodeError(
                f"the llamacpp backend holds at most {MAX_SEQUENCES} sequences and tree nodes "
                "at once"
            )
        return self.free_ids.pop()

    def retire(self, sequence: int, slots: list[_Slot]) -> None:
        """A fork is gone: its cells are discarded and its ids (chain, tree nodes) are free."""
        if self.context:
            for slot in slots:
                self.discard(slot.sequence)
                self.free_ids.append(slot.sequence)
            self.discard(sequence)
            self.free_ids.append(sequence)

    def discard(self, sequence: int, start: int = -1, end: int = -1) -> None:
        """Untag `sequence` from its cells at positions [start, end) (-1: open), keeping the
        cells taken (see the class docstring)."""
        self.lib.llama_memory_seq_cp(self.memory, sequence, self.discard_id, start, end)
        self.lib.llama_memory_seq_rm(self.memory, sequence, start, end)

    def make_room(self, rows: int) -> None:
        """Make sure that a forward of `rows` cells fits, compacting first where it may."""
        live = sum(member._chain_length + len(member._slots) for member in self.members)
        self.stepped_over += rows * (self.used - live)
        worth_it = self.stepped_over > COMPACTION_PAYBACK * live
        if self.used + rows <= self.cells and not worth_it:
            return
        if not any(member._slots for member in self.members):
            self.compact()
        if self.used + rows > self.cells:
            raise SpecDecodeError(
                f"the KV cache of {self.cells} cells is full: lower --max-new-tokens or raise "
                "--max-context"
            )

    def compact(self) -> None:
        """Load every committed chain back into consecutive cells, freeing the others."""
        lib, context = self.lib, self.context
        saved = []
        for member in list(self.members):
            if member._chain_length:
                size = lib.llama_state_seq_get_size(context, member._chain)
                state = (ctypes.c_uint8 * size)()
                written = lib.llama_state_seq_get_data(context, state, size, member._chain)
                saved.append((member, state, written))
        lib.llama_memory_clear(self.memory, False)
        self.used = self.stepped_over = 0
        for member, state, written in saved:
            if lib.llama_state_seq_set_data(context, state, written, member._chain) != written:
                lib.llama_memory_clear(self.memory, False)
                self.used = 0
                for other in self.members:  # each must start over: its next forward refuses
                    other._chain_length = 0
                    other.root_token = None
                    other._prefilled = []
                raise SpecDecodeError("llama.cpp could not compact its KV cache: start over")
            self.used += member._chain_length


class LlamaCppBackend(Backend):
    """A GGUF model on llama.cpp with a tree-capable KV cache.

    The exact kernels (`kernels="matched"`, `"narrow"`, the default, or `"wide"`) run llama.cpp
    so that the result for a token does not depend on how many tokens share its forward:
    verifying k drafts in one batch computes, bit for bit, what decoding them one at a time would,
    and greedy speculation is token-identical to this backend's plain decoding. llama.cpp's stock
    CPU kernels are not batch-invariant:

    - weights repacked for the CPU (`use_extra_bufts`) run a matrix-vector kernel for the last
      `rows % 4` rows of a product and a matrix-matrix kernel, with another summation order, for
      the groups of 4 before them;
    - unrepacked K-quant weights switch to a tiled kernel from 8 rows on (`GGML_CPU_TILED_MM`);
    - flash attention splits the KV range across threads for a single query once the cache holds
      512 cells, when K and V are both float16 (or float32), and tiles queries from 64 on; without
      flash attention, the attention products go through llamafile's tinyBLAS from 2 rows on.

    Every exact kernel turns flash attention on. They keep every row on one summation order in
    three ways:

    - matched: llama.cpp's matrix-vector kernel for repacked Q4_K weights is replaced by
      specdecode's, which sums in the order of llama.cpp's matrix-matrix kernel, and its Q6_K dot
      product by one that sums in the order of its tiled kernel (llamacpp_matched); V is kept
      in bfloat16 beside K in float16, which rules out both the split-KV path and query tiling
      (they need K and V of one type; bfloat16 rounds the values at 2^-9 relative, far below the
      4-bit weights' own error). A forward of any width is one batch: verification runs at
      llama.cpp's batch speed, plain decoding at its single-token speed. Only for files whose
      multiplied weights are all Q4_K or Q6_K (`uncovered_weights`); checked at load on the model
      itself, falling back to narrow with a warning.
    - narrow: a forward that returns logits is decoded in pieces of at most 3 rows (the later
      ones see the earlier ones as cached slots), which take the matrix-vector kernel a single
      token takes, each row on its own; KV types as matched. Plain decoding runs at stock speed; a
      drafted token costs 0.6 to 0.75 of a plain step. Tested bit for bit on every file of the
      registry (K-quants, Q8_0, Q5_0, Q4_1 weights); on x86 llama.cpp may send F16, BF16, Q8_0,
      Q4_0, Q5_0 and IQ4_NL weights through tinyBLAS from 2 rows on, so a file of other types
      deserves the same test.
    - wide: every batch is padded with scratch tokens to a multiple of 4 rows (outputs too), so
      that every row takes the matrix-matrix kernel and no query is alone; the tiled kernel is
      off; pieces of at most 60 rows, below the query tiling. The scratch tokens sit in a sequence
      of their own that nothing attends to, and their cells are discarded after the forward. A plain
      step costs what 4 tokens do, but wide verification runs at about stock speed.

    Only the prompt's prefill, which returns no logits, runs wider and unpadded: plain and
    speculative decoding share it, so both start from the same cache. llama.cpp reads the tiled
    kernel's switch once per process, and the matched kernels' own kernels must be in place
    before llama.cpp starts: a process calls `reserve_kernels` with every kernel it will run
    before it loads any model. `kernels="stock"` keeps llama.cpp's other defaults: verification is
    cheaper per token, but a near-tie can resolve differently in a batch than alone.
    """

    hidden_states_refusal = (
        "llama.cpp's Python binding hands out the last layer's output only, not the inner "
        "layers' hidden states a trained draft head reads: use --backend torch"
    )

    truncate_commits_prefix = False  # tree nodes join the chain only through keep()
    supports_batching = True

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        max_context: int = 4096,
        kernels: str = "narrow",
        sequences: int = 1,
    ) -> None:
        """`sequences`: how many sequences (this one and its `fork`s) the KV cache holds at
        `max_context` tokens each."""
        reserve_kernels([kernels])  # also refuses an unknown name
        plan = KERNEL_PLANS[kernels]
        lib = import_llama_cpp()
        self._lib = lib
        path = Path(path)
        if not path.is_file():
            raise SpecDecodeError(f"no GGUF file at {path}: give a registry name or a .gguf path")
        if plan.own_kernels:
            reason = uncovered_weights(path)
            if reason:
                raise SpecDecodeError(
                    f"the matched kernels are not exact for this file ({reason}): use --backend "
                    "llamacpp, which picks exact kernels for the file, or llamacpp-narrow"
                )
        if max_context < 16:
            raise SpecDecodeError(f"the context must hold at least 16 tokens, got {max_context}")
        if sequences < 1:
            raise SpecDecodeError(f"the cache must hold at least 1 sequence, got {sequences}")
        threads = threads or torch.get_num_threads()
        if threads < 1:
            raise SpecDecodeError(f"threads must be at least 1, got {threads}")
        if plan.tiled_off and not tiled_kernel_off():
            raise SpecDecodeError(
                f"the {kernels} kernels need llama.cpp's tiled kernel off from llama.cpp's start, "
                "and this process started it with the kernel on: run them in a process of their "
                "own, call specdecode.backends.llamacpp.reserve_kernels(['narrow', 'wide']) before "
                f"loading any llama.cpp model, or start Python with {_TILED_SWITCH}=0"
            )
        lib.llama_backend_init()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model = lib.llama_model_load_from_file(str(path).encode(), model_params)
        if not model:
            raise SpecDecodeError(
                f"llama.cpp could not load {path}: is it a GGUF file of an architecture this "
                "llama.cpp supports? (run with a registry model, or update llama-cpp-python)"
            )
        cells = sequences * max_context + SPARE_CELLS
        context_params = lib.llama_context_default_params()
        context_params.n_ctx = cells
        # llama.cpp sizes its output buffers for the largest batch and every sequence at once,
        # and asserts that they fit in the context.
        sequence_ids = min(MAX_SEQUENCES, cells)
        context_params.n_batch = BATCH_SIZE
        context_params.n_ubatch = BATCH_SIZE
        context_params.n_seq_max = sequence_ids
        context_params.kv_unified = True  # cells shared between sequences: how trees are held
        context_params.n_threads = threads
        context_params.n_threads_batch = threads
        if plan.flash_attention:
            context_params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if plan.kv_types is not None:
            context_params.type_k, context_params.type_v = plan.kv_types
        context = lib.llama_init_from_model(model, context_params)
        if not context:
            lib.llama_model_free(model)
            raise SpecDecodeError(
                f"llama.cpp could not create a context of {cells} cells ({sequences} x "
                f"{max_context} tokens): lower --max-context"
            )
        self._llama = _Context(
            lib, model, context, lib.llama_n_ctx(context), sequence_ids, plan.scratch_rows
        )
        vocab = lib.llama_model_get_vocab(model)
        # Room is kept for the scratch rows that pad a batch.
        super().__init__(lib.llama_vocab_n_tokens(vocab), max_context - (plan.row_multiple - 1))
        self.path = path
        self.threads = threads
        self.kernels = kernels
        self.exact = plan.exact
        self.max_sequences = sequences
        self._plan = plan
        # the most tokens a forward takes, so that a padded batch still fits
        self._batch_size = BATCH_SIZE - BATCH_SIZE % plan.row_multiple
        self.prefill_chunk = min(self._batch_size, self.max_context)
        self._chain = self._llama.take_id()  # the sequence id of the committed tokens
        self._chain_length = 0  # committed tokens, at positions 0..n-1 of the chain
        self._slots: list[_Slot] = []  # tree nodes after the chain, in cache order
        self._llama.members.add(self)
        if plan.own_kernels:
            self._check_matched()

    @property
    def cost_key(self) -> str:
        stat = self.path.stat()
        ident = f"{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{self._lib.__version__}"
        digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
        # What else decides the costs: llama.cpp's tiled kernel for the widest forwards, and
        # specdecode's kernels in place of llama.cpp's (they apply to every model in the process).
        kernels = self._plan.cost_name
        if self._plan.reaches_tiled_kernel:
            kernels += "-untiled" if tiled_kernel_off() else "-tiled"
        if llamacpp_matched.loaded() and not self._plan.own_kernels:
            kernels += "-with-matched"
        return f"llamacpp-{kernels}-{self.path.stem}-{digest}-{self.threads}threads"

    # ---- the Backend primitives ----------------------------------------------------------------

    @property
    def num_cached(self) -> int:
        return self._chain_length + len(self._slots)

    def forward(self, token_ids, positions=None, tree_mask=None, return_logits=True):
        count = int(token_ids.shape[0])
        if count == 0:
            return torch.empty(0, self.vocab_size) if return_logits else None
        if count > self._batch_size:
            raise SpecDecodeError(
                f"the llamacpp backend decodes at most {self._batch_size} tokens at once, "
                f"got {count}"
            )
        if self.num_cached + count > self.max_context:
            raise SpecDecodeError(
                f"the sequence would exceed the context of {self.max_context} tokens: "
                "lower --max-new-tokens or shorten the prompt"
            )
        if positions is None:
            positions = self.num_cached + torch.arange(count)
        if tree_mask is None and self._slots:  # causal after the tree slots: all before is seen
            tree_mask = torch.ones(count, count + len(self._slots), dtype=torch.bool).tril(
                len(self._slots)
            )
        tokens, positions = token_ids.tolist(), positions.tolist()
        # Rows that want logits go in pieces that keep every row on one kernel.
        piece = self._plan.piece_rows if self._plan.piece_rows and return_logits else count
        self._llama.make_room(self._padded_rows(count, piece))
        cached_before = self.num_cached
        logits = []
        try:
            for start in range(0, count, piece):
                end = min(start + piece, count)
                if tree_mask is None:
                    self._decode_chain(tokens[start:end], positions[start:end], return_logits)
                else:
                    # the earlier pieces are cached slots now, seen through the mask's columns
                    columns = tree_mask.shape[1] - count + end
                    self._decode_tree(
                        tokens[start:end],
                        positions[start:end],
                        tree_mask[start:end, :columns],
                        return_logits,
                    )
                if return_logits:
                    logits.append(self._read_logits(end - start))
        except SpecDecodeError:
            self.truncate(cached_before)
            self._llama.discard(self._chain, self._chain_length)  # a failed decode's chain cells
            raise
        return torch.cat(logits) if return_logits else None

    def truncate(self, length: int) -> None:
        length = max(0, length)
        if length >= self.num_cached:
            return
        kept_slots = max(0, length - self._chain_length)
        for slot in self._slots[kept_slots:]:
            self._release(slot)
        del self._slots[kept_slots:]
        if length < self._chain_length:
            self._llama.discard(self._chain, length)
            self._chain_length = length

    def keep(self, start: int, offsets: Sequence[int]) -> None:
        rows = [start + offset for offset in offsets]
        chained = [row for row in rows if row < self._chain_length]
        if chained != list(range(start, start + len(chained))):
            raise SpecDecodeError(
                "the llamacpp backend keeps only a path after the committed chain"
            )
        path = [self._slots[row - self._chain_length] for row in rows[len(chained) :]]
        end = start + len(chained)
        if end < self._chain_length:
            self.truncate(end)
        memory = self._llama.memory
        for slot in path:
            if slot.position != self._chain_length:
                raise SpecDecodeError(
                    "the llamacpp backend keeps only a root-to-node path of the last tree"
                )
            # Tagging the node's cell with the chain's id appends it to the committed chain.
            self._lib.llama_memory_seq_cp(
                memory, slot.sequence, self._chain, slot.position, slot.position + 1
            )
            self._chain_length += 1
        kept = {id(slot) for slot in path}
        for slot in self._slots:
            self._release(slot, keep_cell=id(slot) in kept)
        self._slots.clear()

    # ---- many sequences at once ----------------------------------------------------------------

    def fork(self) -> LlamaCppBackend:
        """Another sequence in this backend's KV cache (same weights, same context): the cache
        holds `max_sequences` of them at full context. Its id goes back to the cache, and its cells
        to the discarded ones, when it is garbage-collected."""
        llama = self._llama
        if len(llama.members) >= self.max_sequences:
            raise SpecDecodeError(
                f"this llama.cpp cache was made for {self.max_sequences} sequences: load the model "
                "for more (SpecDecoder.load(..., sequences=N); specdecode serve sizes it by "
                "--max-batch)"
            )
        twin = copy.copy(self)
        Backend.__init__(twin, self.vocab_size, self.max_context)
        twin._chain = llama.take_id()
        twin._chain_length = 0
        twin._slots = []
        llama.members.add(twin)
        # `_slots` is only ever changed in place, so the finalizer sees the fork's last nodes.
        weakref.finalize(twin, llama.retire, twin._chain, twin._slots).atexit = False
        return twin

    def forward_trees(
        self, sequences: Sequence[Backend], trees: Sequence[DraftTree]
    ) -> list[torch.Tensor]:  # per sequence: [N+1, V]
        """Every sequence's tree in one `llama_decode` when they share this backend's cache (in
        pieces, with the narrow and wide kernels; in as few batches as fit `BATCH_SIZE`). Each row
        is computed as in a forward of its sequence alone: the exact kernels' bits do not depend
        on the rows beside a row, and attention reads only the row's own sequence's cells, in
        position order (`_Context`)."""
        llama = self._llama
        if not all(isinstance(b, LlamaCppBackend) and b._llama is llama for b in sequences):
            return super().forward_trees(sequences, trees)
        if len({id(b) for b in sequences}) != len(sequences):
            raise ValueError("forward_trees() got the same sequence twice")
        backends = [b for b in sequences if isinstance(b, LlamaCppBackend)]
        inputs = [b.tree_inputs(tree) for b, tree in zip(backends, trees, strict=True)]
        nodes = sum(ids.shape[0] for ids, _, mask in inputs if mask is not None)
        if nodes > len(llama.free_ids):
            raise SpecDecodeError(
                f"the batch's trees need {nodes} llama.cpp sequence ids and {len(llama.free_ids)} "
                "are free: lower --tree-nodes or --max-batch"
            )
        # Sequences in groups that fit a batch, and room for all of them before the first.
        groups: list[tuple[int, int]] = []
        start = 0
        while start < len(backends):
            stop, rows = start, 0
            while stop < len(backends) and (
                stop == start or rows + inputs[stop][0].shape[0] <= self._batch_size
            ):
                rows += inputs[stop][0].shape[0]
                stop += 1
            groups.append((start, stop))
            start = stop
        piece = self._plan.piece_rows
        cells = 0
        for start, stop in groups:
            rows = sum(ids.shape[0] for ids, _, _ in inputs[start:stop])
            cells += self._padded_rows(rows, piece or rows)
        llama.make_room(cells)
        cached_before = [b.num_cached for b in backends]
        logits: list[torch.Tensor] = []
        try:
            for start, stop in groups:
                logits.extend(self._forward_group(backends[start:stop], inputs[start:stop]))
        except SpecDecodeError:
            for b, length in zip(backends, cached_before, strict=True):
                b.truncate(length)  # every group's trees, and the chains' committed rows
                llama.discard(b._chain, b._chain_length)  # a failed decode's chain cells
            raise
        for b in backends:
            b.last_hidden = None
        return logits

    def _forward_group(
        self,
        backends: list[LlamaCppBackend],
        inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    ) -> list[torch.Tensor]:  # per sequence: [N+1, V]
        """One batch of `forward_trees` (which makes the room and rolls back on failure)."""
        counts = [int(ids.shape[0]) for ids, _, _ in inputs]
        total = sum(counts)
        if total > self._batch_size:
            raise SpecDecodeError(
                f"the llamacpp backend decodes at most {self._batch_size} tokens at once, "
                f"got a tree of {total}"
            )
        piece = self._plan.piece_rows or total
        rows: list[tuple[int, int, list[int]]] = []  # token, position, sequence ids
        chains: list[tuple[LlamaCppBackend, int]] = []  # a chain's backend and its new tokens
        for b, (ids, positions, tree_mask) in zip(backends, inputs, strict=True):
            tokens, places = ids.tolist(), positions.tolist()
            if tree_mask is None and not b._slots:
                if places != list(range(b._chain_length, b._chain_length + len(tokens))):
                    raise SpecDecodeError("a chain must continue the committed positions")
                rows.extend((t, p, [b._chain]) for t, p in zip(tokens, places, strict=True))
                chains.append((b, len(tokens)))
            else:
                if tree_mask is None:  # slots of an earlier forward: seen, as causal
                    tree_mask = torch.ones(
                        len(tokens), len(tokens) + len(b._slots), dtype=torch.bool
                    ).tril(len(b._slots))
                members = b._add_tree(tokens, places, tree_mask)
                rows.extend(zip(tokens, places, members, strict=True))
        logits = []
        for first in range(0, total, piece):
            part = rows[first : first + piece]
            self._fill_batch(*map(list, zip(*part, strict=True)), want_logits=True)
            self._decode()
            logits.append(self._read_logits(len(part)))
        for b, count in chains:
            b._chain_length += count
        return list(torch.cat(logits).split(counts))

    # ---- llama.cpp plumbing --------------------------------------------------------------------

    def _padded_rows(self, count: int, piece: int) -> int:
        """The cells that `count` rows take, decoded in pieces of `piece`, with the padding."""
        pieces = -(-count // piece)
        return count + pieces * (self._plan.row_multiple - 1)

    def _check_matched(self) -> None:
        """Check that a batch gives each row the bits it gets alone. It would not if the kernel
        were not in place, or a llama.cpp version summed otherwise; the narrow kernels, exact with
        any matrix-vector kernel, then take over, with a warning."""
        # Batches of 9 and 17 rows against the same rows alone: llama.cpp's Q4_K matrix-matrix
        # kernel takes the rows in groups of 4 (and of 16 from 16 rows on), its matrix-vector
        # kernel the last row; its Q6_K tiled kernel takes all rows from 8 on, its dot product a
        # lone row.
        tokens = torch.tensor([(17 + 7919 * i) % self.vocab_size for i in range(21)])
        self.extend(tokens[:4].tolist())
        alone = torch.cat([self.forward(tokens[i : i + 1]) for i in range(4, 21)])
        exact = True
        for rows in (9, 17):
            self.truncate(4)
            exact = exact and torch.equal(alone[:rows], self.forward(tokens[4 : 4 + rows]))
        self.reset()
        if not exact:
            warnings.warn(
                "specdecode: the matched llama.cpp kernels are not exact with this llama.cpp "
                f"(llama-cpp-python {self._lib.__version__}); running the narrow kernels instead",
                RuntimeWarning,
                stacklevel=3,
            )
            self.kernels = "narrow"
            self._plan = KERNEL_PLANS["narrow"]

    def _release(self, slot: _Slot, keep_cell: bool = False) -> None:
        """Untag every cell the slot could see; its own cell goes to the discarded ones (see
        `_Context`), unless the chain keeps it."""
        llama = self._llama
        if not keep_cell:
            llama.discard(slot.sequence, slot.position, slot.position + 1)
        self._lib.llama_memory_seq_rm(llama.memory, slot.sequence, -1, -1)
        llama.free_ids.append(slot.sequence)

    def _decode_chain(self, tokens: list[int], positions: list[int], want_logits: bool) -> None:
        if positions != list(range(self._chain_length, self._chain_length + len(tokens))):
            raise SpecDecodeError("a chain must continue the committed positions")
        self._fill_batch(tokens, positions, [[self._chain]] * len(tokens), want_logits)
        self._decode()
        self._chain_length += len(tokens)

    def _decode_tree(
        self,
        tokens: list[int],
        positions: list[int],
        tree_mask: torch.Tensor,  # [T, S] bool: the last S - T cached slots, then the new tokens
        want_logits: bool,
    ) -> None:
        count = len(tokens)
        members = self._add_tree(tokens, positions, tree_mask)
        try:
            self._fill_batch(tokens, positions, members, want_logits)
            self._decode()
        except SpecDecodeError:
            self.truncate(self.num_cached - count)
            raise

    def _add_tree(
        self,
        tokens: list[int],
        positions: list[int],
        tree_mask: torch.Tensor,  # [T, S] bool: the last S - T cached slots, then the new tokens
    ) -> list[list[int]]:  # per token: the sequence ids a batch lists it under
        """Register `tokens` as new slots and tag what each may see; the batch then lists each
        token under its own id and those of the new slots that see it."""
        count = len(tokens)
        cached_columns = tree_mask.shape[1] - count
        if cached_columns < 0 or cached_columns > len(self._slots):
            raise SpecDecodeError("the tree mask covers more cached slots than are tree nodes")
        free_ids = self._llama.free_ids
        if len(free_ids) < count:
            raise SpecDecodeError(
                f"the llamacpp backend holds at most {MAX_SEQUENCES} sequences and tree nodes at "
                f"once; {count} more nodes do not fit beside those held"
            )
        first_column_slot = len(self._slots) - cached_columns
        new_slots = [_Slot(pos, free_ids.pop()) for pos in positions]
        cached_slots = list(self._slots)
        # Registered before tagging, so that any failure below releases every tag and id.
        self._slots.extend(new_slots)
        try:
            return self._tag(positions, tree_mask, cached_slots, first_column_slot, new_slots)
        except SpecDecodeError:
            self.truncate(self.num_cached - count)
            raise

    def _tag(
        self,
        positions: list[int],
        tree_mask: torch.Tensor,  # [T, S] bool
        cached_slots: list[_Slot],
        first_column_slot: int,
        new_slots: list[_Slot],
    ) -> list[list[int]]:
        cached_columns = len(cached_slots) - first_column_slot
        visible = tree_mask.tolist()
        memory = self._llama.memory
        members: list[list[int]] = [[slot.sequence] for slot in new_slots]
        for row, slot in enumerate(new_slots):
            # A query sees the committed chain, every slot left of the mask's columns, and the
            # slots the mask allows.
            self._lib.llama_memory_seq_cp(memory, self._chain, slot.sequence, -1, -1)
            seen = cached_slots[:first_column_slot] + [
                cached_slots[first_column_slot + column]
                for column in range(cached_columns)
                if visible[row][column]
            ]
            for other in seen:
                if other.position >= slot.position:
                    raise SpecDecodeError("a tree node must sit deeper than every node it sees")
                self._lib.llama_memory_seq_cp(
                    memory, other.sequence, slot.sequence, other.position, other.position + 1
                )
            for column in range(row):
                if visible[row][cached_columns + column]:
                    if positions[column] >= slot.position:
                        raise SpecDecodeError("a tree node must sit deeper than every node it sees")
                    members[column].append(slot.sequence)
        return members

    def _fill_batch(
        self,
        tokens: list[int],
        positions: list[int],
        sequences: list[list[int]],
        want_logits: bool,
    ) -> None:
        padding = -len(tokens) % self._plan.row_multiple
        rows = len(tokens) + padding
        batch = self._llama.batch
        batch.n_tokens = rows
        for i, (token, position, ids) in enumerate(zip(tokens, positions, sequences, strict=True)):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = len(ids)
            for k, sequence in enumerate(ids):
                batch.seq_id[i][k] = sequence
        for i in range(padding):
            row = len(tokens) + i
            batch.token[row] = 0
            batch.pos[row] = i  # a sequence's positions must be consecutive, from 0 when empty
            batch.n_seq_id[row] = 1
            batch.seq_id[row][0] = self._llama.scratch_id
        # The output rows go through the vocabulary projection as one product: with the wide
        # kernels their count is padded too. llama.cpp wants at least one output row.
        for i in range(rows):
            batch.logits[i] = want_logits or i >= rows - self._plan.row_multiple

    def _decode(self) -> None:
        llama = self._llama
        status = self._lib.llama_decode(llama.context, llama.batch)
        if status != 0:
            llama.used = llama.cells  # unknown: the next forward compacts first
        else:
            llama.used += llama.batch.n_tokens
        if llama.scratch_id is not None:
            llama.discard(llama.scratch_id)
        if status != 0:
            raise SpecDecodeError(
                f"llama.cpp failed to decode a batch (status {status}): the KV cache may be full; "
                "lower --max-new-tokens or raise --max-context"
            )

    def _read_logits(self, count: int) -> torch.Tensor:  # [count, V] float32
        pointer = self._lib.llama_get_logits(self._llama.context)
        array = np.ctypeslib.as_array(
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(count, self.vocab_size)
        )
        return torch.from_numpy(array.copy())
