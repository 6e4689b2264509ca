"""Token Recycling: draft from the candidate tokens that verification computed and threw away.

Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large Language Models with
Token Recycling" (ACL 2025). Every verification forward computes next-token logits at the root
and at every drafted node; only the accepted path's are used. Their top `candidates` tokens are
kept instead, in an adjacency matrix: row t holds the most likely successors of token t, as the
target last saw them (a later sighting overwrites the row). A draft walks the matrix from the
last committed token: a chain follows each row's first candidate; a tree (`--tree`, any shape:
its width and node budget are used) grows a template, where a node is "the r-th candidate of its
parent's token", and each node's token is read from the matrix.

The template is chosen best first by the chance that a node is accepted: the product, down its
path, of how often a rank-r candidate was accepted when its parent was (learned from the verdicts,
from a prior worth `prior_weight` tries). The paper uses one static template of about 80 nodes
tuned offline for a GPU; learning it keeps the nodes where they are accepted on whatever tree
budget a CPU can afford. A node's `confidence` is its rank's acceptance rate, for a cost-aware
controller.

The matrix (vocabulary x `candidates` int32, 4.9 MB for Qwen2.5's vocabulary at 8) and the rank
counts live as long as the engine (a server, or a bench run's prompts), as the paper's "hot
start": they hold the target's own next-token rankings, never a request's text. Nothing is drafted
where a row has not been seen yet. Reading the logits costs a top-k over the forward's rows, which
the engine already holds; the target does no extra work. Drafts are deterministic (point-mass
proposals).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from specdecode.drafters.base import NO_TARGET_OUTPUT, Drafter, DrafterResources, TargetOutput
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget, DraftTree
from specdecode.verify.base import Verdict

#: How often a rank-r candidate is accepted when its parent is, before any verdict (a guess from
#: greedy top-k agreement of small models: the first candidate is right about half the time).
PRIOR_ACCEPTED = (0.5, 0.15, 0.08, 0.05, 0.03, 0.02, 0.015, 0.01)


@dataclass
class RecyclingState:
    """What the drafter keeps across requests (in the engine's `drafter_state`)."""

    successors: np.ndarray  # [V, candidates] int32 token ids, -1 = not seen yet
    tries: np.ndarray  # [candidates] float64: rank-r nodes verified under an accepted parent
    hits: np.ndarray  # [candidates] float64: of those, accepted

    @property
    def nbytes(self) -> int:
        return self.successors.nbytes + self.tries.nbytes + self.hits.nbytes


class TokenRecyclingDrafter(Drafter):
    name = "token-recycling"
    supports_trees = True
    keeps_model_statistics = True
    # An update credits the rank statistics only when the verified rows were its own proposal.
    proposes_freely = True

    def __init__(
        self,
        vocab_size: int,
        candidates: int = 8,
        prior_weight: float = 20.0,
        shared: dict[str, Any] | None = None,
        tree: bool = False,
    ) -> None:
        if not 1 <= candidates <= 64:
            raise SpecDecodeError(f"token-recycling needs 1 <= candidates <= 64, got {candidates}")
        if prior_weight <= 0:
            raise SpecDecodeError(f"token-recycling needs prior_weight > 0, got {prior_weight}")
        if vocab_size < 1:
            raise SpecDecodeError(f"token-recycling needs the vocabulary's size, got {vocab_size}")
        self.candidates = candidates
        self.tree = tree
        shared = shared if shared is not None else {}
        key = f"token-recycling:{vocab_size}:{candidates}"
        if key not in shared:
            prior = np.resize(np.asarray(PRIOR_ACCEPTED), candidates)
            prior[len(PRIOR_ACCEPTED) :] = PRIOR_ACCEPTED[-1]
            shared[key] = RecyclingState(
                successors=np.full((vocab_size, candidates), -1, dtype=np.int32),
                tries=np.full(candidates, prior_weight),
                hits=prior * prior_weight,
            )
        self.state: RecyclingState = shared[key]
        self.reset()

    @classmethod
    def create(cls, options: dict[str, Any], resources: DrafterResources) -> TokenRecyclingDrafter:
        return cls(
            resources.target.vocab_size,
            **options,
            shared=resources.shared,
            tree=resources.tree is not None,
        )

    def reset(self) -> None:
        self.rows: list[int] = []  # the last proposal's verified rows: the root, then its nodes
        self.ranks: list[int] = []
        self.parents: list[int] = []

    def propose(self, context: Sequence[int], budget: Budget) -> DraftTree:
        root = int(context[-1])
        self.rows, self.ranks, self.parents = [root], [], []
        width = min(budget.max_width if self.tree else 1, self.candidates)
        most = min(budget.max_nodes or 0, budget.max_depth * width)
        if budget.max_depth == 0 or most == 0:
            return DraftTree.empty()
        successors = self.state.successors
        accepted_rate = self.state.hits / self.state.tries  # [candidates]
        confidence: list[float] = []
        depths: list[int] = []
        # Best first by path probability: (-probability, order, parent node, rank, parent token).
        frontier = [(-accepted_rate[rank], rank, -1, rank, root) for rank in range(width)]
        heapq.heapify(frontier)
        order = width
        while frontier and len(self.ranks) < most:
            negative, _, parent, rank, parent_token = heapq.heappop(frontier)
            token = int(successors[parent_token, rank])
            depth = 1 if parent < 0 else depths[parent] + 1
            if token < 0 or depth > budget.max_depth:
                continue  # not seen yet (its subtree neither), or too deep
            node = len(self.ranks)
            self.rows.append(token)
            self.ranks.append(rank)
            self.parents.append(parent)
            confidence.append(float(accepted_rate[rank]))
            depths.append(depth)
            for child_rank in range(width):
                order += 1
                probability = negative * accepted_rate[child_rank]
                heapq.heappush(frontier, (probability, order, node, child_rank, token))
        if not self.ranks:
            return DraftTree.empty()
        return DraftTree(
            torch.tensor(self.rows[1:], dtype=torch.long),
            torch.tensor(self.parents, dtype=torch.long),
            confidence=torch.tensor(confidence, dtype=torch.float32),
        )

    def update(self, verdict: Verdict, target: TargetOutput = NO_TARGET_OUTPUT) -> None:
        if target.logits is None:
            return
        verified = target.logits.shape[0]  # [N+1, V]: a controller may have cut the chain
        # The forward's tokens, whoever drafted them; without them, this drafter's own proposal.
        rows = target.tokens.tolist() if target.tokens is not None else self.rows[:verified]
        if len(rows) != verified:
            return  # not this drafter's proposal, and the forward did not say what it was
        if rows == self.rows[:verified]:
            # The rank statistics: each verified node whose parent was accepted was a fair try.
            accepted = set(verdict.path)
            for node in range(verified - 1):
                parent = self.parents[node]
                if parent < 0 or parent in accepted:
                    self.state.tries[self.ranks[node]] += 1
                    self.state.hits[self.ranks[node]] += node in accepted
        top = torch.topk(target.logits, self.candidates, dim=-1).indices  # [N+1, candidates]
        self.state.successors[np.asarray(rows)] = top.to(torch.int32).numpy()
        self.rows = []
