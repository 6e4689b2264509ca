"""`eagle`: drafts with an EAGLE-3 head (see `specdecode.heads.eagle3`) on the target's hidden
states, which the target computes anyway while verifying.

State kept in step with the target: the head's own KV cache holds one entry per committed token
but the last, the pair (the target's fused features at token i, the embedding of token i+1). After
each verification the target's features at the root and the accepted nodes (`TargetOutput.hidden`,
rows `[0] + [n + 1 for n in path]`) pair with the tokens the verdict emitted; they are run through
the head at the next `propose`, whose last output drafts the first token. Each further draft step
pairs the head's previous output with the token it drafted, at the next position; the drafts'
cache entries are dropped at the next update.

Chains draft the head's argmax (greedy) or a draw from its shaped distribution (sampling, which
hands the verifier `draft_probs`); trees are grown by any tree shape from the head's logits
(`--tree dynamic` gives EAGLE-2's context-dependent trees). Drafting stops early below
`min_confidence` (the head's probability of its own draft). The verifier decides what is emitted
over the full vocabulary, so drafts from a trimmed vocabulary cost speed, never output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from specdecode.backends.base import Backend
from specdecode.config import SamplingParams
from specdecode.drafters.base import NO_TARGET_OUTPUT, Drafter, DrafterResources, TargetOutput
from specdecode.errors import SpecDecodeError
from specdecode.heads import head_dir, loaded
from specdecode.heads.attention import HeadCache
from specdecode.heads.eagle3 import WEIGHTS_FILE, Eagle3Head, load_head
from specdecode.sampling import sample_from, shaped_probs
from specdecode.tree import Budget, DraftTree
from specdecode.trees import TreeShape
from specdecode.trees.base import FedNodes
from specdecode.verify.base import Verdict

#: Committed pairs run through the head in pieces of at most this many (a long prompt's attention
#: scores would otherwise be prompt x prompt at once).
_FEED_CHUNK = 512


class EagleDrafter(Drafter):
    name = "eagle"
    samples_drafts = True
    supports_trees = True

    def __init__(
        self,
        head: Eagle3Head,
        target: Backend,
        min_confidence: float = 0.0,
        tree: TreeShape | None = None,
    ) -> None:
        if not 0.0 <= min_confidence < 1.0:
            raise SpecDecodeError(
                f"the eagle drafter's min_confidence must be in [0, 1), got {min_confidence}"
            )
        self.head = head
        self.target = target
        self.tree = tree
        self.min_confidence = min_confidence
        self.hidden_layers = tuple(head.cfg.aux_layers)
        self.dtype = head.fc.weight.dtype
        self.device = head.fc.weight.device
        self.cache = HeadCache(
            head.cfg.num_kv_heads, head.cfg.head_dim, target.max_context, self.dtype, self.device
        )
        self.vocab_size = target.vocab_size
        self.target_ids = head.target_ids.cpu()  # [draft_vocab]; drafts are chosen on the CPU
        self.sampling = SamplingParams()
        self.rng: torch.Generator | None = None
        self.reset()

    @classmethod
    def create(cls, options: dict[str, Any], resources: DrafterResources) -> Drafter:
        unknown = set(options) - {"head", "min_confidence"}
        if unknown:
            raise SpecDecodeError(
                f"the 'eagle' drafter takes only head and min_confidence, got {sorted(unknown)}"
            )
        target = resources.target
        config = target.model_config
        if config is None or not target.supports_hidden_states:
            raise SpecDecodeError(target.hidden_states_refusal)
        if resources.tree is not None and float(options.get("min_confidence", 0.0)) > 0:
            raise SpecDecodeError(
                "--draft-min-confidence stops eagle's chains; a tree is sized by --tree-nodes"
            )
        if config.family != "llama":
            raise SpecDecodeError(
                f"EAGLE-3 heads draft for Llama / Qwen2 targets, not {config.family}"
            )
        directory = head_dir(options.get("head"), resources.model_name, "eagle")
        table = target.token_embeddings(torch.zeros(1, dtype=torch.long))  # its dtype and device
        head = loaded(
            directory / WEIGHTS_FILE,
            (config, table.dtype, table.device),
            lambda: load_head(directory, config, dtype=table.dtype, device=table.device),
        )
        return cls(head, target, float(options.get("min_confidence", 0.0)), resources.tree)

    def reset(self) -> None:
        self.cache.length = 0
        self._pending_features: list[torch.Tensor] = []  # [n, 3, H] target features
        self._pending_tokens: list[int] = []  # the token after each of them
        self._last_out: torch.Tensor | None = None  # [H] the head's output at the last pair
        self._last_logits: torch.Tensor | None = None  # [draft_vocab] its draft logits
        self._committed = 0  # committed pairs in the cache

    def begin(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        rng: torch.Generator | None,
        target: TargetOutput = NO_TARGET_OUTPUT,
    ) -> None:
        self.sampling = sampling
        self.rng = rng
        self.reset()
        if len(prompt) > 1:
            if target.hidden is None or target.hidden.shape[0] != len(prompt) - 1:
                raise RuntimeError("the eagle drafter needs the prompt's hidden states")
            self._pending_features.append(target.hidden)
            self._pending_tokens.extend(int(t) for t in prompt[1:])

    def update(self, verdict: Verdict, target: TargetOutput = NO_TARGET_OUTPUT) -> None:
        if target.hidden is None:
            raise RuntimeError("the eagle drafter needs the verification's hidden states")
        rows = [0] + [node + 1 for node in verdict.path]  # the root and the accepted nodes
        self._pending_features.append(target.hidden[rows])
        self._pending_tokens.extend(verdict.tokens)
        self.cache.length = self._committed  # drop this step's drafts

    def _catch_up(self) -> None:
        """Run the pending committed pairs through the head (once per step, while drafting)."""
        if not self._pending_tokens:
            return
        features = torch.cat(self._pending_features).to(self.device)  # [n, 3, H]
        tokens = torch.tensor(self._pending_tokens, dtype=torch.long)
        self._pending_features, self._pending_tokens = [], []
        for start in range(0, tokens.shape[0], _FEED_CHUNK):
            piece = slice(start, start + _FEED_CHUNK)
            hidden = self.head.fuse(features[piece])
            count = hidden.shape[0]
            positions = torch.arange(self._committed, self._committed + count)
            out = self.head.step(self.cache, hidden, self._embed(tokens[piece]), positions)
            self._committed += count
        self._last_out = out[-1]
        self._last_logits = self.head.logits(out[-1:])[0].float().cpu()

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return self.target.token_embeddings(tokens).to(self.dtype)

    def _full_vocab(self, draft_values: torch.Tensor, fill: float) -> torch.Tensor:
        """[..., draft_vocab] -> [..., V]: each draft id's value at its target id."""
        shape = (*draft_values.shape[:-1], self.vocab_size)
        out = torch.full(shape, fill, dtype=draft_values.dtype)
        out[..., self.target_ids] = draft_values
        return out

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        self._catch_up()
        if self._committed != len(context) - 1:
            raise RuntimeError("the eagle drafter's cache is out of step with the context")
        depth = min(budget.max_depth, self.target.max_context - len(context) - 1)
        if depth <= 0 or self._last_out is None:
            return DraftTree.empty()
        if self.tree is not None:
            expander = _HeadExpander(self, self._committed - 1)
            root_logits = self._full_vocab(self._last_logits, float("-inf"))
            budget = Budget(depth, budget.max_width, budget.max_nodes)
            return self.tree.grow(root_logits, expander, budget, self.sampling, self.rng)
        return self._chain(depth)

    def _chain(self, depth: int) -> DraftTree:
        logits, out = self._last_logits, self._last_out
        drafts: list[int] = []
        probs: list[torch.Tensor] = []
        confidence: list[float] = []
        for step in range(depth):
            if self.sampling.greedy:
                draft_id = int(logits.argmax())
                chance = float(torch.softmax(logits, dim=-1)[draft_id])
            else:
                dist = shaped_probs(logits, self.sampling)  # [draft_vocab]
                draft_id = int(sample_from(dist, self.rng))
                probs.append(dist)
                chance = float(dist[draft_id])
            token = int(self.target_ids[draft_id])
            drafts.append(token)
            confidence.append(chance)
            if step + 1 == depth or chance < self.min_confidence:
                break
            out = self.head.step(
                self.cache,
                out[None],
                self._embed(torch.tensor([token])),
                torch.tensor([self._committed + step]),
            )[0]
            logits = self.head.logits(out[None])[0].float().cpu()
        forecast = torch.tensor(confidence)
        if self.sampling.greedy:
            return DraftTree.chain(drafts, confidence=forecast)
        return DraftTree.chain(drafts, self._full_vocab(torch.stack(probs), 0.0))


class _HeadExpander:
    """Runs tree nodes through the head level by level: a node pairs its parent's output with its
    own token, at its depth's position, and sees the committed pairs and its ancestors."""

    def __init__(self, drafter: EagleDrafter, root_position: int) -> None:
        """`root_position`: one before the first draft pair's position (the last committed
        pair's), so that a node at depth d sits at `root_position + d`."""
        self.drafter = drafter
        self.fed = FedNodes(root_position)
        self.out: dict[int, torch.Tensor] = {-1: drafter._last_out}  # node -> head output [H]

    def expand(self, nodes: list[int], parents: list[int], tokens: list[int]) -> torch.Tensor:
        drafter = self.drafter
        visible, positions = self.fed.add(nodes, parents)
        hidden = torch.stack([self.out[parents[node]] for node in nodes])  # [n, H]
        token_ids = torch.tensor([tokens[node] for node in nodes], dtype=torch.long)
        out = drafter.head.step(
            drafter.cache,
            hidden,
            drafter._embed(token_ids),
            positions,
            visible,
        )
        for row, node in enumerate(nodes):
            self.out[node] = out[row]
        logits = drafter.head.logits(out).float().cpu()  # [n, draft_vocab]
        return drafter._full_vocab(logits, float("-inf"))
