"""Training an EAGLE-3 head on cached target features (see `ttt.py` for the loss, `loop.py` for the
loop every head shares).

Initialisation from the target: `lm_head` is the target's output layer restricted to the draft
vocabulary and `norm` its final norm, so the head starts in the target's output space; `fc` passes
the highest of the three features through (`[0, 0, I]`) and the decoder layer's output projections
start at zero. Untrained, the head is then the target "exited early" at its high layer, which
predicts the token the pair already holds rather than the next one: a starting point, not a
useful drafter (its held-out agreement is reported before training).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from specdecode.heads.eagle3 import Eagle3Config, Eagle3Head
from specdecode.train.loop import TrainReport, TrainSettings, train_head
from specdecode.train.ttt import Example, ttt_scores

__all__ = ["TrainReport", "TrainSettings", "init_from_target", "train_eagle"]


def init_from_target(
    head: Eagle3Head, lm_head: torch.Tensor, final_norm: torch.Tensor, vocab: torch.Tensor
) -> None:
    """See the module docstring."""
    hidden = head.cfg.hidden_size
    with torch.no_grad():
        head.set_draft_vocabulary(vocab)
        head.lm_head.weight.copy_(lm_head[vocab].float())
        head.norm.weight.copy_(final_norm.float())
        head.fc.weight.zero_()
        head.fc.weight[:, 2 * hidden :] = torch.eye(hidden)
        head.midlayer.self_attn.o_proj.weight.zero_()
        head.midlayer.mlp.down_proj.weight.zero_()


def train_eagle(
    examples: list[Example],
    config: Eagle3Config,
    embed: torch.Tensor,  # [V, H] the target's token embedding
    lm_head: torch.Tensor,  # [V, H] the target's output layer
    final_norm: torch.Tensor,  # [H]
    settings: TrainSettings,
    work_dir: Path,
    stop_after: int | None = None,
) -> tuple[Eagle3Head, TrainReport]:
    """Train a head on `examples` (see `loop.train_head`)."""

    def build(vocab: torch.Tensor) -> tuple[Eagle3Head, dict]:
        shaped = Eagle3Config(**{**asdict(config), "draft_vocab_size": int(vocab.shape[0])})
        head = Eagle3Head(shaped)
        init_from_target(head, lm_head, final_norm, vocab)
        return head, asdict(shaped)

    def scorer(head: Eagle3Head, draft_id_of: torch.Tensor):
        return lambda example: ttt_scores(head, embed, example, settings.ttt_steps, draft_id_of)

    head, report = train_head(
        examples, settings, config.vocab_size, build, scorer, work_dir, "eagle head", stop_after
    )
    assert isinstance(head, Eagle3Head)
    return head, report
