"""Training Kangaroo's adapter on cached target features (the loop is `loop.py`'s).

The features are the states entering the target's layer `exit_layer` (the shallow sub-network's
output) at every token. The adapter runs over a whole sequence with causal attention, and its
output at row `t` is trained on the target's own next token there, `labels[t]`: the paper trains
on the last layer's distribution, of which greedy verification accepts the argmax. One step is
all it needs: a draft feeds the adapter the shallow states of the drafted token itself, which are
exactly the training features whenever the drafts so far were right (no drift to train against).

Initialisation: the output projection is zero and the adapter's norm is the target's final norm,
so an untrained adapter is plain early exit at that layer (its held-out agreement before training
is early exit's); the output layer is the target's, frozen, over the draft vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from specdecode.heads.kangaroo import KangarooAdapter, KangarooConfig
from specdecode.train.loop import Scorer, TrainReport, TrainSettings, train_head
from specdecode.train.ttt import Example, StepScore, score_rows

#: `train-drafter --kind kangaroo`'s passes over the data unless told (see `default_epochs`).
ADAPTER_EPOCHS = 8


def kangaroo_scores(
    adapter: KangarooAdapter,
    example: Example,
    draft_id_of: torch.Tensor,  # [V] int64: target id -> draft id, -1 outside the draft vocab
) -> list[StepScore]:
    """The adapter's loss and agreement with the target's next token at every row."""
    states = example.features[:, 0].to(adapter.q_proj.weight.dtype)  # [T, H]
    out = adapter.sequence(states)
    rows = slice(0, example.tokens.shape[0])
    return [score_rows(out, adapter.logits, example, rows, draft_id_of)]


def train_kangaroo(
    examples: list[Example],
    config: KangarooConfig,
    lm_head: torch.Tensor,  # [V, H] the target's output layer
    final_norm: torch.Tensor,  # [H] the target's
    settings: TrainSettings,
    work_dir: Path,
    stop_after: int | None = None,
) -> tuple[KangarooAdapter, TrainReport]:
    """Train an adapter on `examples` (see `loop.train_head`); the draft vocabulary is chosen
    here."""

    def build(vocab: torch.Tensor) -> tuple[KangarooAdapter, dict[str, Any]]:
        shaped = replace(config, draft_vocab=tuple(vocab.tolist()))
        adapter = KangarooAdapter(shaped)
        with torch.no_grad():
            adapter.o_proj.weight.zero_()
            adapter.norm.weight.copy_(final_norm.float())
            adapter.lm_head.weight.copy_(lm_head[vocab].float())
        return adapter, {**asdict(shaped), "draft_vocab": len(vocab)}

    def scorer(adapter: KangarooAdapter, draft_id_of: torch.Tensor) -> Scorer:
        return lambda example: kangaroo_scores(adapter, example, draft_id_of)

    adapter, report = train_head(
        examples,
        settings,
        config.vocab_size,
        build,
        scorer,
        work_dir,
        "kangaroo adapter",
        stop_after,
    )
    assert isinstance(adapter, KangarooAdapter)
    return adapter.requires_grad_(False), report
