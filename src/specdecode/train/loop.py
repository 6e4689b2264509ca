"""The training loop every draft head shares: held-out split, draft vocabulary, AdamW with warm-up
and cosine decay, checkpoints and resume, per-epoch held-out agreement.

A head kind supplies the head (initialised) and how to score it on one example: a `StepScore` per
draft step (the loss summed over the trained rows, and agreement counts). Deterministic given the
seed: the draft vocabulary, the initial weights, the held-out split and each epoch's order of
sequences all come from it, so a run that is interrupted and resumed from its last checkpoint ends
with the head an uninterrupted run gives (on the same machine).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from specdecode.errors import SpecDecodeError
from specdecode.train.ttt import Example, StepScore, weighted_loss

CHECKPOINT = "checkpoint.pt"

#: Scores a head on one example: one `StepScore` per draft step.
Scorer = Callable[[Example], list[StepScore]]


@dataclass(frozen=True)
class TrainSettings:
    """How to train (validated): the head's shape and the optimisation."""

    draft_vocab: int = 16384
    intermediate_size: int | None = None  # None: the target's
    ttt_steps: int = 3  # eagle: draft steps of the training-time test
    num_heads: int = 4  # medusa and hydra: heads, each one more token ahead
    epochs: int = 3
    learning_rate: float = 1e-3
    batch_tokens: int = 2048
    heldout_fraction: float = 0.05
    train_fraction: float = 1.0  # share of the training sequences used (learning curves)
    checkpoint_every: int = 20  # optimizer steps
    seed: int = 0
    bfloat16: bool = True  # autocast the forward and backward (fp32 master weights)

    def __post_init__(self) -> None:
        if min(self.ttt_steps, self.num_heads, self.epochs) < 1 or self.draft_vocab < 2:
            raise SpecDecodeError(
                "training needs a draft vocabulary of at least 2 tokens, 1 draft step, 1 epoch"
            )
        if not 0 < self.learning_rate < 1 or self.batch_tokens < 1:
            raise SpecDecodeError("the learning rate must be in (0, 1), the batch at least 1")
        if not 0 < self.heldout_fraction < 0.5:
            raise SpecDecodeError("the held-out fraction must be in (0, 0.5)")
        if not 0 < self.train_fraction <= 1:
            raise SpecDecodeError(
                f"the training fraction must be in (0, 1], got {self.train_fraction}"
            )
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise SpecDecodeError(
                f"the head's intermediate size must be at least 1, got {self.intermediate_size}"
            )


@dataclass
class TrainReport:
    """What training did; `agreement[j]` is the held-out top-1 agreement with the target at draft
    step j, `baseline` that of always drafting the most frequent token."""

    steps: int = 0
    train_tokens: int = 0
    heldout_tokens: int = 0
    seconds: float = 0.0
    loss: float = float("nan")
    agreement: list[float] = field(default_factory=list)
    initial_agreement: list[float] = field(default_factory=list)
    baseline: float = 0.0
    resumed_from: int = 0

    @property
    def expected_tokens_per_forward(self) -> float:
        """A chain's tokens per target forward if step j's agreement were its acceptance rate:
        1 + a0 + a0*a1 + ..."""
        total, reach = 1.0, 1.0
        for rate in self.agreement:
            reach *= rate
            total += reach
        return total


def draft_vocabulary(examples: list[Example], size: int) -> torch.Tensor:
    """The `size` target tokens most often predicted (trained labels), as sorted ids."""
    counts: torch.Tensor | None = None
    for example in examples:
        counted = example.labels[example.loss_mask]
        bins = torch.bincount(counted, minlength=1)
        counts = bins if counts is None else _add_counts(counts, bins)
    assert counts is not None
    size = min(size, int((counts > 0).sum()))
    # Ties broken by token id, so the choice does not depend on the sort's implementation.
    order = sorted(range(counts.shape[0]), key=lambda t: (-int(counts[t]), t))[:size]
    return torch.tensor(sorted(order), dtype=torch.long)


def _add_counts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape[0] < b.shape[0]:
        a, b = b, a
    a = a.clone()
    a[: b.shape[0]] += b
    return a


def split(examples: list[Example], settings: TrainSettings) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples: a seeded share of whole sequences held out, and of the
    rest the first `train_fraction` in the seeded order (the held-out set does not depend on
    it, so heads trained on more or less data are compared on the same sequences)."""
    if len(examples) < 2:
        raise SpecDecodeError("training needs at least 2 sequences (one is held out)")
    generator = torch.Generator().manual_seed(settings.seed)
    shuffled = torch.randperm(len(examples), generator=generator).tolist()
    held = max(1, round(len(examples) * settings.heldout_fraction))
    kept = max(1, round((len(examples) - held) * settings.train_fraction))
    training = [examples[i] for i in shuffled[held : held + kept]]
    return training, [examples[i] for i in shuffled[:held]]


def draft_ids(vocab: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[V] int64: each target id's draft id, -1 outside the draft vocabulary `vocab`."""
    draft_id_of = torch.full((vocab_size,), -1, dtype=torch.long)
    draft_id_of[vocab] = torch.arange(vocab.shape[0])
    return draft_id_of


def _batches(examples: list[Example], order: list[int], batch_tokens: int) -> list[list[int]]:
    batches, current, tokens = [], [], 0
    for index in order:
        current.append(index)
        tokens += examples[index].tokens.shape[0]
        if tokens >= batch_tokens:
            batches.append(current)
            current, tokens = [], 0
    if current:
        batches.append(current)
    return batches


def _learning_rate(settings: TrainSettings, step: int, total: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to a tenth."""
    warmup = max(1, total // 20)
    if step < warmup:
        return settings.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return settings.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def evaluate(
    head: nn.Module, examples: list[Example], score: Scorer, bfloat16: bool
) -> list[float]:
    """Held-out top-1 agreement with the target at each draft step."""
    correct: list[int] = []
    count: list[int] = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        for example in examples:
            for step, result in enumerate(score(example)):
                if step == len(correct):
                    correct.append(0)
                    count.append(0)
                correct[step] += result.correct
                count[step] += result.count
    return [c / n if n else 0.0 for c, n in zip(correct, count, strict=True)]


def fit(
    head: nn.Module,
    train: list[Example],
    heldout: list[Example],
    score: Scorer,
    identity: dict[str, Any],
    settings: TrainSettings,
    work_dir: Path,
    description: str,
    stop_after: int | None = None,
) -> TrainReport:
    """Train `head` on `train`, checkpointing into `work_dir` and resuming from a checkpoint of
    the same settings, `identity` (the head's config) and data. `stop_after` ends after that many
    optimizer steps (as an interruption would, for tests)."""
    optimizer = torch.optim.AdamW(
        [p for p in head.parameters() if p.requires_grad],
        lr=settings.learning_rate,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    epochs = [
        _batches(
            train,
            torch.randperm(
                len(train), generator=torch.Generator().manual_seed(settings.seed + e)
            ).tolist(),
            settings.batch_tokens,
        )
        for e in range(settings.epochs)
    ]
    schedule = [batch for epoch in epochs for batch in epoch]
    epoch_ends = [sum(len(e) for e in epochs[: k + 1]) for k in range(len(epochs))]
    report = TrainReport(
        train_tokens=sum(e.tokens.shape[0] for e in train),
        heldout_tokens=sum(e.tokens.shape[0] for e in heldout),
    )
    labels = torch.cat([e.labels[e.loss_mask] for e in train])
    held_labels = torch.cat([e.labels[e.loss_mask] for e in heldout])
    report.baseline = float((held_labels == torch.mode(labels).values).float().mean())

    checkpoint_path = work_dir / CHECKPOINT
    data = _fingerprint(train + heldout)
    start = 0
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, weights_only=False)
        same = state.get("settings") == asdict(settings) and state.get("config") == identity
        if same and state.get("data") == data:
            head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            start = report.resumed_from = int(state["step"])
            report.initial_agreement = state["initial_agreement"]
    if not report.initial_agreement:
        report.initial_agreement = evaluate(head, heldout, score, settings.bfloat16)
    started = time.perf_counter()
    head.train()
    loss_value = float("nan")
    bar = tqdm(total=len(schedule), initial=start, desc=f"training {description}", unit="step")
    for step in range(start, len(schedule)):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(settings, step, len(schedule))
        batch = schedule[step]
        total = 0.0
        for index in batch:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bfloat16):
                loss = weighted_loss(score(train[index])) / len(batch)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = total
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        done = step + 1
        end_of_epoch = done in epoch_ends
        if done % settings.checkpoint_every == 0 or done == len(schedule) or end_of_epoch:
            _save_checkpoint(
                checkpoint_path, head, optimizer, done, settings, identity, report, data
            )
        if end_of_epoch and done < len(schedule):
            agreement = evaluate(head, heldout, score, settings.bfloat16)
            bar.write(
                f"epoch {epoch_ends.index(done) + 1}: loss {loss_value:.3f}, held-out agreement "
                "by draft step " + " ".join(f"{a:.3f}" for a in agreement)
            )
        if stop_after is not None and done - start >= stop_after:
            break
    bar.close()
    head.eval()
    report.steps = len(schedule) if stop_after is None else min(len(schedule), start + stop_after)
    report.loss = loss_value
    report.seconds = time.perf_counter() - started
    report.agreement = evaluate(head, heldout, score, settings.bfloat16)
    return report


def train_head(
    examples: list[Example],
    settings: TrainSettings,
    vocab_size: int,
    build: Callable[[torch.Tensor], tuple[nn.Module, dict[str, Any]]],
    scorer: Callable[[nn.Module, torch.Tensor], Scorer],
    work_dir: Path,
    description: str,
    stop_after: int | None = None,
) -> tuple[nn.Module, TrainReport]:
    """What every kind's training does: hold out whole sequences, pick the draft vocabulary from
    the training labels, `build(vocab)` the initialised head (seeded; with its config as the
    checkpoint's identity), and `fit` it with `scorer(head, draft_id_of)`."""
    train, heldout = split(examples, settings)
    vocab = draft_vocabulary(train, settings.draft_vocab)
    torch.manual_seed(settings.seed)
    head, identity = build(vocab)
    score = scorer(head, draft_ids(vocab, vocab_size))
    report = fit(head, train, heldout, score, identity, settings, work_dir, description, stop_after)
    return head, report


def _fingerprint(examples: list[Example]) -> str:
    """What the training data is (its tokens, labels and masks), so that a checkpoint of a run on
    other data is not resumed."""
    digest = hashlib.sha256()
    for example in examples:
        for tensor in (example.tokens, example.labels, example.loss_mask):
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _save_checkpoint(path, head, optimizer, step, settings, identity, report, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(
        {
            "step": step,
            "head": head.state_dict(),
            "optimizer": optimizer.state_dict(),
            "settings": asdict(settings),
            "config": identity,
            "initial_agreement": report.initial_agreement,
            "data": data,
        },
        partial,
    )
    partial.replace(path)
