"""Medusa-1 draft heads (Cai et al., 2024, "Medusa: Simple LLM Inference Acceleration Framework
with Multiple Decoding Heads"), in the Medusa repository's checkpoint layout.

K heads sit on the target's last hidden state `h_t` after its final norm (what the target's own
output layer reads) at the last token `t` it has run. The target's logits there give token `t+1`;
head `k` (from 0) predicts token `t+k+2` on its own, without seeing the tokens between: each is
`num_layers` residual blocks `x + SiLU(W x + b)` and an output layer. So one draft step gives K
tokens at once, for a chain or the levels of a tree; the heads never see what they drafted, which
is what Hydra changes.

Draft vocabulary: drafting scores only the rows of the output layers for the N target tokens most
often predicted in training (FR-Spec's trim; vLLM calls the list `token_map`); verification runs
over the full vocabulary, so a trimmed one costs speed, never output.

Checkpoint (the Medusa repository's): `config.json` with `medusa_num_heads`, `medusa_num_layers`,
`base_model_name_or_path`, plus `hidden_size` and `vocab_size`, and a `specdecode` entry with the
draft vocabulary and how the head was made; `medusa_lm_head.safetensors` with
`{k}.{l}.linear.weight` [H, H] and `{k}.{l}.linear.bias` [H] for each block `l`, and
`{k}.{num_layers}.weight` [V, H], each head's output layer over the full vocabulary (rows outside
the draft vocabulary are the target's own output layer, Medusa's initialisation, untrained).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.errors import SpecDecodeError
from specdecode.heads.checkpoint import (
    StateHeadsConfig,
    read_config_json,
    read_weights,
    write_checkpoint,
)
from specdecode.models.config import TransformerConfig

WEIGHTS_FILE = "medusa_lm_head.safetensors"


class MedusaConfig(StateHeadsConfig):
    """The heads' shape and the target they were made for."""

    def to_json(self) -> dict[str, Any]:
        return {
            "medusa_num_heads": self.num_heads,
            "medusa_num_layers": self.num_layers,
            **self.common_json(),
        }


class MedusaHeads(nn.Module):
    """The K heads, their output layers restricted to the draft vocabulary."""

    def __init__(self, cfg: MedusaConfig) -> None:
        super().__init__()
        if not cfg.draft_vocab:
            raise SpecDecodeError("Medusa heads need a draft vocabulary")
        self.cfg = cfg
        size = cfg.hidden_size
        self.blocks = nn.ModuleList(
            nn.ModuleList(nn.Linear(size, size) for _ in range(cfg.num_layers))
            for _ in range(cfg.num_heads)
        )
        self.lm_heads = nn.ModuleList(
            nn.Linear(size, len(cfg.draft_vocab), bias=False) for _ in range(cfg.num_heads)
        )
        self.register_buffer("target_ids", torch.tensor(cfg.draft_vocab, dtype=torch.long))

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        """Draft logits of every head: [n, H] (final-normed target states) -> [K, n, draft]."""
        outs = []
        for blocks, lm_head in zip(self.blocks, self.lm_heads, strict=True):
            x = normed
            for block in blocks:
                x = x + F.silu(block(x))
            outs.append(lm_head(x))
        return torch.stack(outs)


def save_heads(
    heads: MedusaHeads,
    full_lm_head: torch.Tensor,  # [V, H] the target's output layer: the untrained rows
    directory: Path,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Write config.json and the weights in the Medusa layout."""
    cfg = heads.cfg
    tensors: dict[str, torch.Tensor] = {}
    for k in range(cfg.num_heads):
        for layer, block in enumerate(heads.blocks[k]):
            tensors[f"{k}.{layer}.linear.weight"] = block.weight.detach().to(dtype)
            tensors[f"{k}.{layer}.linear.bias"] = block.bias.detach().to(dtype)
        rows = full_lm_head.detach().clone().to(dtype)
        rows[heads.target_ids] = heads.lm_heads[k].weight.detach().to(dtype)
        tensors[f"{k}.{cfg.num_layers}.weight"] = rows
    write_checkpoint(directory, cfg.to_json(), WEIGHTS_FILE, tensors)


def read_config(directory: Path, target: TransformerConfig | None = None) -> MedusaConfig:
    """The heads' config; the Medusa repository's names no sizes, which `target` fills in."""
    raw = read_config_json(directory)
    if "medusa_num_heads" not in raw:
        raise SpecDecodeError(f"{directory} is not a Medusa head (no medusa_num_heads in config)")
    if target is not None:
        raw = {"hidden_size": target.hidden_size, "vocab_size": target.vocab_size, **raw}
    layers = raw.get("medusa_num_layers", 1)
    config = MedusaConfig.from_json(raw, raw["medusa_num_heads"], layers, directory / "config.json")
    assert isinstance(config, MedusaConfig)
    return config


def load_heads(
    directory: str | Path,
    target: TransformerConfig,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> MedusaHeads:
    """Load heads for `target`, refusing heads of another model or a damaged file."""
    directory = Path(directory).expanduser()
    cfg = read_config(directory, target)
    cfg.check_target(target, str(directory))
    tensors = read_weights(directory, WEIGHTS_FILE)
    heads = MedusaHeads(cfg)
    state: dict[str, torch.Tensor] = {}
    try:
        for k in range(cfg.num_heads):
            for layer in range(cfg.num_layers):
                for part in ("weight", "bias"):
                    state[f"blocks.{k}.{layer}.{part}"] = tensors[f"{k}.{layer}.linear.{part}"]
            full = tensors[f"{k}.{cfg.num_layers}.weight"]  # [V, H]
            if full.shape != (cfg.vocab_size, cfg.hidden_size):
                raise SpecDecodeError(
                    f"the Medusa head {directory} has an output layer of shape "
                    f"{list(full.shape)}, its config says {[cfg.vocab_size, cfg.hidden_size]}"
                )
            state[f"lm_heads.{k}.weight"] = full[heads.target_ids]
    except KeyError as exc:
        raise SpecDecodeError(
            f"the Medusa head {directory} lacks the weight {exc}: its config says "
            f"{cfg.num_heads} heads of {cfg.num_layers} blocks"
        ) from None
    expected = heads.state_dict()
    for name, value in state.items():
        if value.shape != expected[name].shape:
            raise SpecDecodeError(
                f"the Medusa head {directory} has a weight of shape {list(value.shape)} where "
                f"its config says {list(expected[name].shape)}"
            )
    state = {name: value.float() for name, value in state.items()}
    heads.load_state_dict(state | {"target_ids": heads.target_ids})
    return heads.to(device=device, dtype=dtype).eval().requires_grad_(False)
