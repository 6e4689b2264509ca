"""Training Medusa-1 heads on cached target features (the loop is `loop.py`'s).

The features are the target's last-layer states (before its final norm, which is applied here, as
the drafter does). Head `k` at row `t` is trained on the target's own token `k+1` places after the
next one, `labels[t + k + 1]`, its cross-entropy weighted 0.8^k (Medusa-1's decay, as for the
draft steps of EAGLE-3's training-time test).

Initialisation, as Medusa's: the residual blocks are zero (each head starts as the identity) and
every output layer is the target's own, restricted to the draft vocabulary, so an untrained head
predicts the token the target already gives, the one before its own: a starting point.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from specdecode.backends.torch.model import rms_norm
from specdecode.heads.medusa import MedusaConfig, MedusaHeads
from specdecode.train.loop import TrainReport, TrainSettings, train_head
from specdecode.train.ttt import Example, StepScore, score_rows


def medusa_scores(
    heads: MedusaHeads,
    final_norm: torch.Tensor,  # [H] the target's
    eps: float,
    example: Example,
    draft_id_of: torch.Tensor,  # [V] int64: target id -> draft id, -1 outside the draft vocab
) -> list[StepScore]:
    """Each head's loss and agreement on `example` (fewer heads on a short sequence)."""
    dtype = heads.lm_heads[0].weight.dtype
    normed = rms_norm(example.features[:, 0].to(dtype), final_norm.to(dtype), eps, 0.0)  # [T, H]
    scores = []
    length = example.tokens.shape[0]
    for k, (blocks, lm_head) in enumerate(zip(heads.blocks, heads.lm_heads, strict=True)):
        rows = length - k - 1
        if rows <= 0:
            break
        x = normed[:rows]
        for block in blocks:
            x = x + torch.nn.functional.silu(block(x))
        scores.append(score_rows(x, lm_head, example, slice(k + 1, k + 1 + rows), draft_id_of))
    return scores


def train_medusa(
    examples: list[Example],
    config: MedusaConfig,
    lm_head: torch.Tensor,  # [V, H] the target's output layer
    final_norm: torch.Tensor,  # [H]
    eps: float,
    settings: TrainSettings,
    work_dir: Path,
    stop_after: int | None = None,
) -> tuple[MedusaHeads, TrainReport]:
    """Train heads on `examples` (see `loop.train_head`); `config.draft_vocab` is chosen here."""

    def build(vocab: torch.Tensor) -> tuple[MedusaHeads, dict]:
        shaped = MedusaConfig(**{**asdict(config), "draft_vocab": tuple(vocab.tolist())})
        heads = MedusaHeads(shaped)
        with torch.no_grad():
            for blocks, output in zip(heads.blocks, heads.lm_heads, strict=True):
                for block in blocks:
                    block.weight.zero_()
                    block.bias.zero_()
                output.weight.copy_(lm_head[vocab].float())
        return heads, {**asdict(shaped), "draft_vocab": len(vocab)}

    norm = final_norm.detach().float()

    def scorer(heads: MedusaHeads, draft_id_of: torch.Tensor):
        return lambda example: medusa_scores(heads, norm, eps, example, draft_id_of)

    heads, report = train_head(
        examples, settings, config.vocab_size, build, scorer, work_dir, "medusa heads", stop_after
    )
    assert isinstance(heads, MedusaHeads)
    return heads, report
