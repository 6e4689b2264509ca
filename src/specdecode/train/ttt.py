"""EAGLE-3's training-time test: the loss of a head that drafts several steps on its own.

One training example is a token sequence with the target's features at every token (`features`,
the hidden states entering the head's three layers), the target's own next token after each
(`labels`, its argmax) and which predictions count (`loss_mask`). With `x` the tokens, `F` the
features and `y` the labels:

- step 0, row i: the pair (fc(F_i), embedding of x_{i+1}) at position i, as when drafting after a
  committed token; its output predicts y_{i+1};
- step j, row i: the pair (step j-1's output at row i, embedding of x_{i+j+1}) at position i+j, as
  the j-th draft step after committed token i; its output predicts y_{i+j+1}.

At step j, row i attends to the step-0 pairs 0..i (the committed tokens) and to its own pairs of
steps 1..j (its earlier drafts): the "diagonal" keys, which make one pass over the sequence
equivalent to drafting j steps after every token at once. Step j's loss is weighted 0.8^j.
Predictions whose label is outside the draft vocabulary are not trained (they cannot be drafted),
but count as misses in the agreement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specdecode.heads.eagle3 import Eagle3Head

STEP_WEIGHT_DECAY = 0.8


@dataclass
class Example:
    """One training sequence; rows are tokens."""

    features: torch.Tensor  # [T, 3, H] the target's hidden states entering the head's layers
    tokens: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64: the target's argmax after each token
    loss_mask: torch.Tensor  # [T] bool: whether the prediction after each token is trained


@dataclass
class StepScore:
    """One draft step's loss and agreement with the target over an example."""

    loss: torch.Tensor  # scalar: summed cross-entropy over the trained rows
    trained: int  # rows in the loss: counted, with the target's token in the draft vocabulary
    correct: int  # counted rows whose argmax is the target's token
    count: int  # rows counted (the loss mask)


def _attend(
    q: torch.Tensor,  # [heads, n, D]
    keys0: torch.Tensor,  # [kv_heads, >=n, D] step-0 keys
    values0: torch.Tensor,
    diagonal_keys: list[torch.Tensor],  # per earlier draft step, [kv_heads, >=n, D]
    diagonal_values: list[torch.Tensor],
    scale: float,
) -> torch.Tensor:  # [heads, n, D]
    heads, rows, _ = q.shape
    group = heads // keys0.shape[0]

    def per_head(t: torch.Tensor) -> torch.Tensor:  # [kv_heads, >=n, D] -> [heads, n, D]
        return t[:, :rows].repeat_interleave(group, dim=0)

    scores = torch.matmul(q, per_head(keys0).transpose(1, 2)) * scale  # [heads, n, n]
    causal = torch.ones(rows, rows, dtype=torch.bool, device=q.device).tril_()
    scores = scores.masked_fill(~causal, float("-inf"))
    extra = [(q * per_head(k)).sum(-1, keepdim=True) * scale for k in diagonal_keys]  # [h, n, 1]
    probs = torch.softmax(torch.cat([scores, *extra], dim=-1).float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs[..., :rows], per_head(values0))
    for m, values in enumerate(diagonal_values):
        out = out + probs[..., rows + m : rows + m + 1] * per_head(values)
    return out


def ttt_outputs(
    head: Eagle3Head,
    embed: torch.Tensor,  # [V, H] the target's (frozen) token embedding
    example: Example,
    steps: int,
) -> list[torch.Tensor]:
    """The head's output at each draft step: `[T-1-j, H]` for step j (fewer steps on a short
    sequence); row i of step j predicts the label after token i+j+1."""
    dtype = head.fc.weight.dtype
    tokens = example.tokens
    length = tokens.shape[0]
    hidden = head.fuse(example.features[: length - 1].to(dtype))  # [T-1, H]
    keys0 = values0 = None
    diagonal_keys: list[torch.Tensor] = []
    diagonal_values: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    for step in range(steps):
        rows = length - 1 - step
        if rows <= 0:
            break
        hidden = hidden[:rows]
        nxt = slice(step + 1, step + 1 + rows)
        positions = torch.arange(rows) + step
        projected = head.project(hidden, embed[tokens[nxt]].to(dtype), positions)
        if step == 0:
            keys0, values0 = projected.k, projected.v
        else:
            diagonal_keys.append(projected.k)
            diagonal_values.append(projected.v)
        attended = _attend(projected.q, keys0, values0, diagonal_keys, diagonal_values, head.scale)
        hidden = head.finish(hidden, attended)  # [rows, H]
        outputs.append(hidden)
    return outputs


def ttt_scores(
    head: Eagle3Head,
    embed: torch.Tensor,  # [V, H] the target's (frozen) token embedding
    example: Example,
    steps: int,
    draft_id_of: torch.Tensor,  # [V] int64: target id -> draft id, -1 outside the draft vocab
) -> list[StepScore]:
    """Each draft step's loss and agreement on `example` (fewer steps on a short sequence)."""
    scores: list[StepScore] = []
    for step, out in enumerate(ttt_outputs(head, embed, example, steps)):
        nxt = slice(step + 1, step + 1 + out.shape[0])
        scores.append(score_rows(out, head.logits, example, nxt, draft_id_of))
    return scores


def score_rows(
    out: torch.Tensor,  # [rows, H] a head's outputs
    logits_of,  # [n, H] -> [n, draft_vocab]
    example: Example,
    labels: slice,  # which of the example's labels (and loss mask) the rows predict
    draft_id_of: torch.Tensor,  # [V] int64: target id -> draft id, -1 outside the draft vocab
) -> StepScore:
    """One draft step's summed cross-entropy and agreement; the output layer runs on trained rows
    only (rows outside the loss mask cost nothing there)."""
    target = draft_id_of[example.labels[labels]]  # [rows]
    counted = example.loss_mask[labels]
    trained = counted & (target >= 0)
    logits = logits_of(out[trained]).float()  # [n, draft_vocab]
    picked = target[trained]
    loss = F.cross_entropy(logits, picked, reduction="sum") if picked.numel() else out.sum() * 0
    correct = int((logits.argmax(-1) == picked).sum()) if picked.numel() else 0
    return StepScore(loss, int(picked.numel()), correct, int(counted.sum()))


def weighted_loss(scores: list[StepScore]) -> torch.Tensor:
    """The training objective: each step's mean cross-entropy, weighted 0.8^step, summed."""
    total = scores[0].loss * 0
    for step, score in enumerate(scores):
        if score.trained:
            total = total + (STEP_WEIGHT_DECAY**step) * score.loss / score.trained
    return total
