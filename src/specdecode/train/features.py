"""The target's features for training, computed once and kept on disk.

For each training sequence one file, named by a hash of the model, the layers, its tokens and loss
mask, holds what the head trains on: the hidden states entering the head's layers at every token
(`features [T, 3, H]`, bfloat16), the tokens, the target's argmax after each token (`labels`) and
the loss mask. Self-distilled answers arrive with their features (`save`, from the batched
generation that wrote them); `compute` runs the target over any other sequence. Files are
written under a temporary name and renamed, so an interrupted run leaves only whole files, and a
rerun computes only the missing ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from specdecode.backends.base import Backend
from specdecode.errors import SpecDecodeError
from specdecode.train.data import TrainingSequence
from specdecode.train.ttt import Example

#: Tokens per target forward while computing features (the logits of each are kept as argmax).
CHUNK = 512


@dataclass(frozen=True)
class FeatureStore:
    """The features of one target model, one file per sequence (named by the model too, so that
    one directory can serve several models without mixing them)."""

    directory: Path
    layers: tuple[int, ...]
    model: str = ""

    def path(self, sequence: TrainingSequence) -> Path:
        digest = hashlib.sha256(
            json.dumps([self.model, self.layers, sequence.tokens, sequence.loss_mask]).encode()
        )
        return self.directory / f"{digest.hexdigest()[:20]}.safetensors"

    def compute(self, target: Backend, sequences: Sequence[TrainingSequence]) -> None:
        """Run the target over every sequence not on disk yet, capturing the layers."""
        layers = self.layers
        self.directory.mkdir(parents=True, exist_ok=True)
        todo = [i for i in range(len(sequences)) if not self.path(sequences[i]).is_file()]
        if not todo:
            return
        target.capture_hidden(layers)
        tokens_todo = sum(len(sequences[i].tokens) for i in todo)
        with tqdm(total=tokens_todo, desc="target features", unit="tok", leave=False) as bar:
            for index in todo:
                sequence = sequences[index]
                ids = torch.tensor(sequence.tokens, dtype=torch.long)
                if ids.shape[0] >= target.max_context:
                    raise SpecDecodeError(
                        f"a training sequence of {ids.shape[0]} tokens exceeds the context"
                    )
                target.reset()
                target.take_captured()
                labels = []
                with torch.inference_mode():
                    for start in range(0, ids.shape[0], CHUNK):
                        logits = target.forward(ids[start : start + CHUNK])
                        labels.append(logits.argmax(-1))
                        bar.update(min(CHUNK, ids.shape[0] - start))
                self.save(sequence, target.take_captured(), torch.cat(labels))
        target.capture_hidden(())
        target.reset()

    def save(
        self,
        sequence: TrainingSequence,
        features: torch.Tensor,  # [T, layers, H]
        labels: torch.Tensor,  # [T]
    ) -> None:
        """Write one sequence's file, whole or not at all."""
        from safetensors.torch import save_file

        tensors = {
            "features": features.to(torch.bfloat16).cpu().contiguous(),
            "tokens": torch.tensor(sequence.tokens, dtype=torch.long),
            "labels": labels.to(torch.long).cpu().contiguous(),
            "loss_mask": torch.tensor(sequence.loss_mask, dtype=torch.bool),
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.path(sequence).with_suffix(".partial")
        save_file(tensors, str(partial))
        partial.replace(self.path(sequence))

    def load(self, sequences: Sequence[TrainingSequence]) -> list[Example]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        examples = []
        for sequence in sequences:
            path = self.path(sequence)
            try:
                t = load_file(str(path))
            except (SafetensorError, OSError) as exc:
                raise SpecDecodeError(
                    f"the feature file {path} is damaged ({exc}): delete it and rerun"
                ) from None
            examples.append(Example(t["features"], t["tokens"], t["labels"], t["loss_mask"]))
        return examples
