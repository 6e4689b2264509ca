"""Training Hydra heads on cached target features (the loop is `loop.py`'s).

The features are the target's last-layer states (before its final norm, applied here as the
drafter does). Head `k` at row `t` reads `[h_t, E(x_{t+1}), ..., E(x_{t+k+1})]`, the sequence's
own tokens standing in for the drafts (teacher forcing: on the target's own answers they are what
the target would have drafted), and is trained on the target's token after them,
`labels[t + k + 1]`, weighted 0.8^k like Medusa's heads. Hydra's "teacher" loss is the
cross-entropy against the target's distribution; with the target's argmax as the label (what
greedy verification accepts) it is this one.

Initialisation: each head's residual projection passes the state through (`[I, 0, ...]`), its MLP
layer and blocks start at zero and its output layer is the target's own (draft vocabulary, zero
bias): an untrained head predicts the target's next token from `h_t`, one place too early.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from specdecode.backends.torch.model import rms_norm
from specdecode.heads.hydra import HydraConfig, HydraHeads
from specdecode.train.loop import TrainReport, TrainSettings, train_head
from specdecode.train.ttt import Example, StepScore, score_rows


def hydra_scores(
    heads: HydraHeads,
    final_norm: torch.Tensor,  # [H] the target's
    eps: float,
    embed: torch.Tensor,  # [V, H] the target's token embedding
    example: Example,
    draft_id_of: torch.Tensor,  # [V] int64: target id -> draft id, -1 outside the draft vocab
) -> list[StepScore]:
    """Each head's loss and agreement on `example` (fewer heads on a short sequence)."""
    dtype = heads.heads[0].first.weight.dtype
    normed = rms_norm(example.features[:, 0].to(dtype), final_norm.to(dtype), eps, 0.0)  # [T, H]
    embeds = embed[example.tokens].to(dtype)  # [T, H]
    length = example.tokens.shape[0]
    scores = []
    for k, head in enumerate(heads.heads):
        rows = length - k - 1
        if rows <= 0:
            break
        inputs = torch.cat(
            [normed[:rows]] + [embeds[j + 1 : j + 1 + rows] for j in range(k + 1)], dim=-1
        )  # [rows, (k+2)H]
        out = head.body(inputs)
        scores.append(
            score_rows(out, head.lm_head, example, slice(k + 1, k + 1 + rows), draft_id_of)
        )
    return scores


def train_hydra(
    examples: list[Example],
    config: HydraConfig,
    embed: torch.Tensor,  # [V, H] the target's token embedding
    lm_head: torch.Tensor,  # [V, H] the target's output layer
    final_norm: torch.Tensor,  # [H]
    eps: float,
    settings: TrainSettings,
    work_dir: Path,
    stop_after: int | None = None,
) -> tuple[HydraHeads, TrainReport]:
    """Train heads on `examples` (see `loop.train_head`); `config.draft_vocab` is chosen here."""
    size = config.hidden_size

    def build(vocab: torch.Tensor) -> tuple[HydraHeads, dict]:
        shaped = HydraConfig(**{**asdict(config), "draft_vocab": tuple(vocab.tolist())})
        heads = HydraHeads(shaped)
        with torch.no_grad():
            for head in heads.heads:
                for layer in (head.first, *head.blocks):
                    layer.weight.zero_()
                    layer.bias.zero_()
                head.res_connection.weight.zero_()
                head.res_connection.weight[:, :size] = torch.eye(size)
                head.lm_head.weight.copy_(lm_head[vocab].float())
                head.lm_head.bias.zero_()
        return heads, {**asdict(shaped), "draft_vocab": len(vocab)}

    norm, table = final_norm.detach().float(), embed.detach()

    def scorer(heads: HydraHeads, draft_id_of: torch.Tensor):
        return lambda example: hydra_scores(heads, norm, eps, table, example, draft_id_of)

    heads, report = train_head(
        examples, settings, config.vocab_size, build, scorer, work_dir, "hydra heads", stop_after
    )
    assert isinstance(heads, HydraHeads)
    return heads, report
