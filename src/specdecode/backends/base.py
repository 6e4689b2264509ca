"""The model backend contract.

A backend owns one model and its KV cache, a preallocated buffer indexed by position. Everything
speculation needs is built from three primitives:

- `forward(token_ids, positions, tree_mask)`: append tokens after the cached ones and return their
  logits. Every new token attends to every cached token; among the new tokens, `tree_mask` says
  who sees whom (None = causal, i.e. a chain). A mask wider than the new tokens, `[T, S]`, also
  covers the `S - T` cached slots before them: how a drafter grows a tree level by level, each
  level seeing its ancestors among the nodes already cached but not their siblings.
- `truncate(length)`: forget everything after `length` (rollback is a length counter).
- `keep(start, offsets)`: compaction; the cache rows `start + offsets[k]` move to `start + k`.
  This is how a tree's accepted path is kept and its rejected branches dropped.

On top of them this base class implements the target-side protocol of the engine:
`prefill(tokens)`, `forward_tree(tree) -> logits [N+1, V]` and `commit(path, next_token)`. The
cache always holds the committed tokens *but the last*: the last committed token (the root) is fed
at the head of the next tree, so that one forward yields both its logits and the drafts'.

Part of the model, for self-speculation: a backend that `supports_layer_plans` runs
`forward_partial(token_ids, plan, ...)`, a forward through the layers a `LayerPlan` keeps, on the
same KV cache. It writes the kept layers' rows of its tokens like `forward`; the caller truncates
them afterwards, and the full forward that verifies the same positions overwrites every layer's
rows, so a partial forward never leaves a trace in what the target computes.

Hidden states, for trained draft heads: after `capture_hidden(layers)`, a backend that
`supports_hidden_states` keeps, from the forwards it runs anyway, the hidden state entering each
listed layer: `prompt_hidden` for the last prefill's rows and `last_hidden` for the last tree's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specdecode.errors import SpecDecodeError
from specdecode.models.config import TransformerConfig
from specdecode.tree import DraftTree

PREFILL_CHUNK = 512


@dataclass(frozen=True)
class LayerPlan:
    """Which parts of the model a partial forward runs: every layer but the sublayers listed in
    `skip_attention` and `skip_mlp` (a skipped sublayer passes its input on unchanged, its
    residual branch left out), and with `exit_layer` only the layers below it; then the final
    norm and the shared output layer."""

    skip_attention: frozenset[int] = frozenset()
    skip_mlp: frozenset[int] = frozenset()
    exit_layer: int | None = None

    def check(self, num_layers: int) -> None:
        """Refuses a plan that names a layer the model lacks, in one line."""
        named = sorted(self.skip_attention | self.skip_mlp)
        if named and (named[0] < 0 or named[-1] >= num_layers):
            raise SpecDecodeError(
                f"the layers to skip must be between 0 and {num_layers - 1} (the model has "
                f"{num_layers} layers), got {named}"
            )
        if self.exit_layer is not None and not 1 <= self.exit_layer <= num_layers:
            raise SpecDecodeError(
                f"the exit layer must be between 1 and {num_layers} (the model has {num_layers} "
                f"layers), got {self.exit_layer}"
            )

    def runs(self, num_layers: int) -> float:
        """The fraction of the layers' sublayers it runs (an attention and an MLP per layer)."""
        top = num_layers if self.exit_layer is None else self.exit_layer
        skipped = sum(1 for layer in self.skip_attention if layer < top)
        skipped += sum(1 for layer in self.skip_mlp if layer < top)
        return (2 * top - skipped) / (2 * num_layers)


class Backend(ABC):
    """A language model with a position-indexed KV cache."""

    #: Whether `forward` honours an arbitrary `tree_mask` (False: chains only).
    supports_trees: bool = True
    #: Whether a tree's leading nodes are committed by truncating after them. True for caches
    #: indexed by position; False where tree nodes live apart from the committed sequence until
    #: `keep` moves them (llama.cpp's sequence ids).
    truncate_commits_prefix: bool = True
    #: tokens per forward when caching a prompt; a backend whose batches are smaller lowers it
    prefill_chunk: int = PREFILL_CHUNK
    #: Whether `capture_hidden` works (the hidden states of inner layers are at hand).
    supports_hidden_states: bool = False
    #: Why not, in the one line a user gets when a drafter needs them.
    hidden_states_refusal: str = "this backend does not hand out its hidden states"
    #: Whether `forward_partial` works (layers can be skipped or exited early).
    supports_layer_plans: bool = False

    def __init__(self, vocab_size: int, max_context: int) -> None:
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.root_token: int | None = None
        self._last_tree_size = 0
        self._prefilled: list[int] = []  # the tokens the last prefill cached
        self.hidden_layers: tuple[int, ...] = ()  # the layers whose hidden states are captured
        self._captured: list[torch.Tensor] = []  # [T, k, H] per forward since the last take
        self.prompt_hidden: torch.Tensor | None = None  # [P-1, k, H] of the last prefill
        self.last_hidden: torch.Tensor | None = None  # [N+1, k, H] of the last forward_tree

    # ---- primitives every backend implements -------------------------------------------------

    @property
    @abstractmethod
    def num_cached(self) -> int:
        """How many positions of the KV cache are filled."""

    @abstractmethod
    def forward(
        self,
        token_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor | None = None,  # [T] int64; default num_cached + arange(T)
        tree_mask: torch.Tensor | None = None,  # [T, S] bool, S >= T; None = causal
        return_logits: bool = True,
    ) -> torch.Tensor | None:  # [T, V] float32
        """Append `token_ids` to the cache and return their next-token logits."""

    @abstractmethod
    def truncate(self, length: int) -> None:
        """Drop every cached position from `length` on."""

    @abstractmethod
    def keep(self, start: int, offsets: Sequence[int]) -> None:
        """Move cache rows `start + offsets[k]` to `start + k` and truncate after them."""

    def forward_partial(
        self,
        token_ids: torch.Tensor,  # [T] int64
        plan: LayerPlan,
        positions: torch.Tensor | None = None,  # [T] int64; default num_cached + arange(T)
        tree_mask: torch.Tensor | None = None,  # [T, S] bool, S >= T; None = causal
        hidden: bool = False,
    ) -> torch.Tensor:  # [T, V] float32, or [T, H] with `hidden`
        """`forward` through the part of the model `plan` keeps (see the module docstring); with
        `hidden`, the states leaving its last layer (before the final norm) instead of logits,
        which a trained adapter reads (Kangaroo)."""
        raise SpecDecodeError(
            f"the {type(self).__name__} backend runs its model whole and cannot skip layers: "
            "use --backend torch for self-speculation"
        )

    def forward_layer(
        self,
        layer: int,
        hidden: torch.Tensor,  # [T, H] the states entering `layer`
        positions: torch.Tensor,  # [T] int64
        tree_mask: torch.Tensor,  # [T, S] bool, S >= T
    ) -> torch.Tensor:  # [T, H] the states leaving it
        """One decoder layer over given hidden states, as tokens after the cache (which see the
        cached slots `tree_mask` leaves them): what CLaSp's search over layers runs. Its keys and
        values go to the slots after the cached ones and are never read (the cache's length is
        unchanged)."""
        raise SpecDecodeError(
            f"the {type(self).__name__} backend runs its model whole and cannot run one layer: "
            "use --backend torch for self-speculation"
        )

    @property
    def num_layers(self) -> int | None:
        """How many decoder layers the model has (None where the backend cannot say)."""
        return None

    @property
    def model_config(self) -> TransformerConfig | None:
        """The architecture, where the backend runs our compact transformer (None elsewhere)."""
        return None

    def token_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        """The input embedding table's rows (unscaled), which trained draft heads share."""
        raise SpecDecodeError(self.hidden_states_refusal)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        """The model's final norm applied to last-layer states (as its output layer reads them),
        which Medusa-style heads read."""
        raise SpecDecodeError(self.hidden_states_refusal)

    def capture_hidden(self, layers: Sequence[int]) -> None:
        """From the next prefill on, keep the hidden state entering each of `layers` (0: the
        embeddings; `num_layers`: the last layer's output before the final norm); `()` stops."""
        layers = tuple(int(layer) for layer in layers)
        if layers == self.hidden_layers:
            return
        if layers:
            if not self.supports_hidden_states:
                raise SpecDecodeError(self.hidden_states_refusal)
            top = self.num_layers
            if top is not None and not all(0 <= layer <= top for layer in layers):
                raise SpecDecodeError(
                    f"hidden states of layers {list(layers)} were asked for, but the model has "
                    f"{top} layers (0 to {top})"
                )
        self.hidden_layers = layers
        self._prefilled = []  # a cached prompt's states were captured for other layers
        self.prompt_hidden = self.last_hidden = None

    def take_captured(self) -> torch.Tensor | None:  # [T, k, H] of the forwards since the last
        """The hidden states captured by `forward` calls since the last take (None: none)."""
        rows, self._captured = self._captured, []
        return torch.cat(rows) if rows else None

    @property
    def cost_key(self) -> str | None:
        """A name for this model on this machine's configuration (file, backend, threads) under
        which its measured forward costs may be cached; None: do not cache, learn online."""
        return None

    # ---- the engine's target protocol ----------------------------------------------------------

    def reset(self) -> None:
        self.truncate(0)
        self.root_token = None
        self._last_tree_size = 0
        self._prefilled = []

    def prefill(self, tokens: Sequence[int]) -> None:
        """Start a sequence: cache all of `tokens` but the last, which becomes the root."""
        if not tokens:
            raise SpecDecodeError("the prompt is empty: give at least one token of text")
        if len(tokens) >= self.max_context:
            raise SpecDecodeError(
                f"the prompt has {len(tokens)} tokens but the context holds {self.max_context}: "
                "shorten the prompt"
            )
        head = [int(t) for t in tokens[:-1]]
        if head and head == self._prefilled and self.num_cached >= len(head):
            # The same prompt again (sampling many continuations): decoding only ever appended
            # after it, so its cache rows are intact and exactly what a fresh prefill computes.
            self.truncate(len(head))
        else:
            self.reset()
            self._captured = []
            self.extend(head)
            self.prompt_hidden = self.take_captured()
            self._prefilled = head
        self.root_token = int(tokens[-1])
        self._last_tree_size = 0

    def extend(self, tokens: Sequence[int]) -> None:
        """Cache `tokens` after the current ones without computing logits (chunked)."""
        ids = torch.as_tensor(list(tokens), dtype=torch.long)
        for start in range(0, ids.shape[0], self.prefill_chunk):
            self.forward(ids[start : start + self.prefill_chunk], return_logits=False)

    def forward_tree(self, tree: DraftTree) -> torch.Tensor:  # [N+1, V]
        """Logits after the root (row 0) and after each node (row i+1), in one forward."""
        ids, positions, tree_mask = self.tree_inputs(tree)
        logits = self.forward(ids, positions, tree_mask)
        self.last_hidden = self.take_captured()
        assert logits is not None
        return logits

    def tree_inputs(
        self, tree: DraftTree
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # ids, positions [N+1], mask
        """What `forward` gets for `tree` (the root then its nodes), checked to fit; the tree is
        then the one `commit` keeps a path of."""
        if self.root_token is None:
            raise RuntimeError("forward_tree() before prefill()")
        if self.num_cached + tree.num_nodes + 1 > self.max_context:
            raise SpecDecodeError(
                f"the sequence would exceed the model's context of {self.max_context} tokens: "
                "lower --max-new-tokens or shorten the prompt"
            )
        ids = torch.cat([torch.tensor([self.root_token], dtype=torch.long), tree.tokens])
        positions = self.num_cached + torch.cat([torch.zeros(1, dtype=torch.long), tree.depths])
        tree_mask = None if tree.is_chain else tree.attention_mask
        if tree_mask is not None and not self.supports_trees:
            raise SpecDecodeError(f"the {type(self).__name__} backend verifies chains only")
        self._last_tree_size = tree.num_nodes
        self._captured = []
        return ids, positions, tree_mask

    # ---- many sequences at once (continuous batching) ------------------------------------------

    #: Whether `fork` gives sequences that `forward_trees` verifies in one forward.
    supports_batching: bool = False
    #: How many sequences (this one and its forks) can exist at once; None: no limit.
    max_sequences: int | None = None

    def fork(self) -> Backend:
        """Another sequence on the same model, with a KV cache of its own."""
        raise SpecDecodeError(
            f"the {type(self).__name__} backend runs one sequence at a time: use --backend torch "
            "to batch requests"
        )

    def forward_trees(
        self, sequences: Sequence[Backend], trees: Sequence[DraftTree]
    ) -> list[torch.Tensor]:  # per sequence: [N+1, V]
        """`forward_tree` of each sequence (this backend and its forks); a backend that batches
        runs them in one forward."""
        pairs = zip(sequences, trees, strict=True)
        return [sequence.forward_tree(tree) for sequence, tree in pairs]

    def commit(self, path: Sequence[int], next_token: int) -> None:
        """Keep the root and the accepted `path` of the last tree; `next_token` is the new root."""
        start = self.num_cached - self._last_tree_size - 1
        offsets = [0] + [node + 1 for node in path]
        if offsets != list(range(len(offsets))) or not self.truncate_commits_prefix:
            self.keep(start, offsets)
        else:
            self.truncate(start + len(offsets))
        self.root_token = int(next_token)
        self._last_tree_size = 0
