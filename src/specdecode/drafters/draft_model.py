"""Draft with an independent smaller model that shares the target's tokenizer.

Leviathan et al. (2023) and Chen et al. (2023): the draft model decodes `k` tokens autoregressively
(argmax when greedy, sampled from its shaped distribution otherwise) and the target verifies them.

The draft model keeps its own KV cache in step with the accepted tokens: its cache holds a prefix
of the committed sequence plus its own latest drafts; before drafting, it drops what was rejected
and feeds, in one forward, the committed tokens it has not seen (the accepted drafts it never fed
and the target's own token), so it never re-reads the prompt.

With `min_confidence` > 0 it stops drafting after a token to which the draft model itself gives
less than that probability (the dynamic draft length of transformers' assisted generation): later
drafts would most likely be rejected, and each costs a draft forward. When to stop depends only on
the draft model, so the output stays the target's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from specdecode.backends.base import Backend
from specdecode.config import SamplingParams
from specdecode.drafters.base import NO_TARGET_OUTPUT, Drafter, DrafterResources, TargetOutput
from specdecode.errors import SpecDecodeError
from specdecode.sampling import sample_from, shaped_probs
from specdecode.tree import Budget, DraftTree
from specdecode.trees import TreeShape
from specdecode.trees.base import FedNodes

#: Catch-ups longer than this skip the logits of all but their last token.
_LOGITS_FOR_ALL_UP_TO = 32


class DraftModelDrafter(Drafter):
    name = "draft-model"
    needs_draft_model = True
    samples_drafts = True
    supports_trees = True

    def __init__(
        self,
        model: Backend,
        target_vocab_size: int,
        min_confidence: float = 0.0,
        tree: TreeShape | None = None,
    ) -> None:
        if not 0.0 <= min_confidence < 1.0:
            raise SpecDecodeError(
                f"the draft-model drafter's min_confidence must be in [0, 1), got {min_confidence}"
            )
        self.model = model
        self.tree = tree
        self.min_confidence = min_confidence
        self.target_vocab_size = target_vocab_size
        self.sampling = SamplingParams()
        self.rng: torch.Generator | None = None
        self._fed: list[int] = []  # the tokens whose KV the draft model's cache holds, in order

    @classmethod
    def create(cls, options: dict[str, Any], resources: DrafterResources) -> Drafter:
        if resources.draft_model is None:
            raise SpecDecodeError(
                "the 'draft-model' drafter needs a draft model: pass --draft-model"
            )
        unknown = set(options) - {"min_confidence"}
        if unknown:
            raise SpecDecodeError(
                f"the 'draft-model' drafter takes only min_confidence, got {sorted(unknown)}"
            )
        return cls(
            resources.draft_model,
            resources.target.vocab_size,
            float(options.get("min_confidence", 0.0)),
            resources.tree,
        )

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

    def reset(self) -> None:
        self.model.reset()
        self._fed = []

    def _catch_up(self, context: Sequence[int]) -> torch.Tensor:  # [V_draft] logits after context
        """Make the cache hold exactly `context` and return the logits after its last token."""
        common = 0
        limit = min(len(self._fed), len(context) - 1)  # always re-feed at least the last token
        while common < limit and self._fed[common] == context[common]:
            common += 1
        self.model.truncate(common)
        unseen = list(context[common:])
        if len(unseen) > _LOGITS_FOR_ALL_UP_TO:
            # The prompt, on the first step: only the last row's logits are wanted, and a
            # prompt's worth of vocabulary-sized rows would cost as much as the rest.
            self.model.extend(unseen[:-1])
            unseen = unseen[-1:]
        logits = self.model.forward(torch.as_tensor(unseen, dtype=torch.long))
        self._fed = list(context)
        assert logits is not None
        return logits[-1]

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        depth = min(budget.max_depth, self.model.max_context - len(context) - 1)
        if depth <= 0:
            return DraftTree.empty()
        logits = self._catch_up(context)
        if self.tree is not None:
            room = self.model.max_context - len(context) - 1
            budget = Budget(depth, budget.max_width, min(budget.max_nodes or 0, room))
            expander = TreeExpander(self.model.forward, len(context))
            # The tree's nodes follow the context in the draft cache, outside `_fed`, so the
            # next catch-up drops them.
            tree = self.tree.grow(logits, expander, budget, self.sampling, self.rng)
            if tree.draft_probs is None:
                return tree
            probs = _match_vocab(tree.draft_probs, self.target_vocab_size)  # [N, V]
            return DraftTree(tree.tokens, tree.parents, probs)

        def feed(token: int) -> torch.Tensor:  # [V_draft] logits after `token`
            out = self.model.forward(torch.tensor([token], dtype=torch.long))
            assert out is not None
            self._fed.append(token)
            return out[-1]

        chain = draft_chain(logits, feed, depth, self.sampling, self.rng, self.min_confidence)
        if chain.draft_probs is None:
            return chain
        probs = _match_vocab(chain.draft_probs, self.target_vocab_size)  # [k, V]
        return DraftTree.chain(chain.tokens.tolist(), probs)


def draft_chain(
    logits: torch.Tensor,  # [V] the drafting model's logits after the root
    feed: Callable[[int], torch.Tensor],  # a drafted token -> [V] the logits after it
    depth: int,
    sampling: SamplingParams,
    rng: torch.Generator | None,
    min_confidence: float = 0.0,
) -> DraftTree:
    """Up to `depth` tokens decoded one by one by a drafting model: the argmax when greedy (no
    draft distribution: the greedy verifier needs none), else a sample of its shaped
    distribution, kept as `draft_probs`. Stops early after a token the drafting model gives less
    than `min_confidence`; the last token is never fed."""
    drafts: list[int] = []
    probs: list[torch.Tensor] = []
    for step in range(depth):
        if sampling.greedy:
            token = int(logits.argmax())
            confident = min_confidence == 0.0 or (
                float(torch.softmax(logits.float(), dim=-1)[token]) >= min_confidence
            )
        else:
            dist = shaped_probs(logits, sampling)  # [V]
            token = int(sample_from(dist, rng))
            probs.append(dist)
            confident = float(dist[token]) >= min_confidence
        drafts.append(token)
        if step + 1 == depth or not confident:
            break
        logits = feed(token)
    return DraftTree.chain(drafts, torch.stack(probs) if probs else None)


#: A model's forward: (token ids [T], positions [T], mask [T, S]) -> logits [T, V].
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]


class TreeExpander:
    """Feeds tree nodes to a drafting model level by level, after the context (whose last token
    the model has cached): each node sees the context and its own ancestors among the nodes fed
    so far."""

    def __init__(self, forward: Forward, context_length: int) -> None:
        self.forward = forward
        self.fed = FedNodes(context_length - 1)

    def expand(self, nodes: list[int], parents: list[int], tokens: list[int]) -> torch.Tensor:
        visible, positions = self.fed.add(nodes, parents)
        logits = self.forward(
            torch.tensor([tokens[n] for n in nodes], dtype=torch.long), positions, visible
        )
        assert logits is not None
        return logits


def _match_vocab(probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Pad or trim the draft vocabulary to the target's (same tokenizer, other padding)."""
    extra = vocab_size - probs.shape[-1]
    if extra > 0:
        return torch.nn.functional.pad(probs, (0, extra))
    if extra < 0:
        # Padding rows of a tokenizer-sized vocabulary never hold real tokens.
        probs = probs[..., :vocab_size]
        return probs / probs.sum(-1, keepdim=True)
    return probs
