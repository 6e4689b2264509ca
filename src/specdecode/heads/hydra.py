"""Hydra draft heads (Ankner et al., 2024, "Hydra: Sequentially-Dependent Draft Heads for Medusa
Decoding").

Like Medusa's, K heads read the target's final-normed last hidden state `h_t` at the last token
`t` it ran, and head `k` predicts token `t+k+2`; unlike Medusa's, head `k` also reads the
embeddings of the tokens between: the committed token `t+1` and the `k` tokens drafted before it
on the same path, so a draft depends on what was drafted above it. Each head is an MLP over
`[h_t, E(x_{t+1}), ..., E(x_{t+k+1})]` ((k+2)H wide): a first layer `proj(u) + SiLU(W u + b)`
(Hydra's learned residual `proj`), `num_layers - 1` residual blocks `x + SiLU(W x + b)`, and an
output layer with a bias over the draft vocabulary. The embedding is the target's (frozen).

Checkpoint: `config.json` with `hydra_num_heads`, `hydra_num_layers`, `hydra_head_arch: "mlp"`,
`base_model_name_or_path`, `hidden_size`, `vocab_size` and a `specdecode` entry (draft vocabulary,
how it was made); `hydra_heads.safetensors` with `{k}.0.linear.*`, `{k}.0.res_connection.weight`,
`{k}.{l}.linear.*` and `{k}.lm_head.{weight,bias}` over the draft vocabulary (trimmed: this is
specdecode's layout, named after Hydra's modules, not a file Hydra's code loads).
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

WEIGHTS_FILE = "hydra_heads.safetensors"


class HydraConfig(StateHeadsConfig):
    """The heads' shape and the target they were made for."""

    def to_json(self) -> dict[str, Any]:
        return {
            "hydra_num_heads": self.num_heads,
            "hydra_num_layers": self.num_layers,
            "hydra_head_arch": "mlp",
            **self.common_json(),
        }


class _Head(nn.Module):
    def __init__(self, inputs: int, size: int, layers: int, draft_vocab: int) -> None:
        super().__init__()
        self.first = nn.Linear(inputs, size)
        self.res_connection = nn.Linear(inputs, size, bias=False)
        self.blocks = nn.ModuleList(nn.Linear(size, size) for _ in range(layers - 1))
        self.lm_head = nn.Linear(size, draft_vocab)

    def body(self, inputs: torch.Tensor) -> torch.Tensor:  # [n, (k+2)H] -> [n, H]
        x = self.res_connection(inputs) + F.silu(self.first(inputs))
        for block in self.blocks:
            x = x + F.silu(block(x))
        return x

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # [n, (k+2)H] -> [n, draft_vocab]
        return self.lm_head(self.body(inputs))


class HydraHeads(nn.Module):
    """The K heads, their output layers over the draft vocabulary."""

    def __init__(self, cfg: HydraConfig) -> None:
        super().__init__()
        if not cfg.draft_vocab:
            raise SpecDecodeError("Hydra heads need a draft vocabulary")
        self.cfg = cfg
        size = cfg.hidden_size
        self.heads = nn.ModuleList(
            _Head((k + 2) * size, size, cfg.num_layers, len(cfg.draft_vocab))
            for k in range(cfg.num_heads)
        )
        self.register_buffer("target_ids", torch.tensor(cfg.draft_vocab, dtype=torch.long))

    def logits(
        self,
        k: int,
        normed: torch.Tensor,  # [n, H] the target's final-normed state
        embeds: torch.Tensor,  # [n, k+1, H] the committed token's and the drafts' embeddings
    ) -> torch.Tensor:  # [n, draft_vocab]
        return self.heads[k](torch.cat([normed, embeds.flatten(1)], dim=-1))


def _names(cfg: HydraConfig) -> dict[str, str]:
    """Our module names -> the checkpoint's."""
    names = {}
    for k in range(cfg.num_heads):
        ours, theirs = f"heads.{k}.", f"{k}."
        names[ours + "first.weight"] = theirs + "0.linear.weight"
        names[ours + "first.bias"] = theirs + "0.linear.bias"
        names[ours + "res_connection.weight"] = theirs + "0.res_connection.weight"
        for layer in range(cfg.num_layers - 1):
            for part in ("weight", "bias"):
                names[ours + f"blocks.{layer}.{part}"] = theirs + f"{layer + 1}.linear.{part}"
        for part in ("weight", "bias"):
            names[ours + f"lm_head.{part}"] = theirs + f"lm_head.{part}"
    return names


def save_heads(heads: HydraHeads, directory: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write config.json and the weights."""
    state = heads.state_dict()
    names = _names(heads.cfg)
    tensors = {theirs: state[ours].to(dtype) for ours, theirs in names.items()}
    write_checkpoint(directory, heads.cfg.to_json(), WEIGHTS_FILE, tensors)


def read_config(directory: Path) -> HydraConfig:
    raw = read_config_json(directory)
    if "hydra_num_heads" not in raw:
        raise SpecDecodeError(f"{directory} is not a Hydra head (no hydra_num_heads in config)")
    if raw.get("hydra_head_arch", "mlp") != "mlp":
        raise SpecDecodeError(
            f"{directory} is a Hydra head of kind {raw['hydra_head_arch']!r}; specdecode runs "
            "the 'mlp' kind"
        )
    layers = raw.get("hydra_num_layers", 1)
    config = HydraConfig.from_json(raw, raw["hydra_num_heads"], layers, directory / "config.json")
    assert isinstance(config, HydraConfig)
    return config


def load_heads(
    directory: str | Path,
    target: TransformerConfig,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> HydraHeads:
    """Load heads for `target`, refusing heads of another model or a damaged file."""
    directory = Path(directory).expanduser()
    cfg = read_config(directory)
    cfg.check_target(target, str(directory))
    tensors = read_weights(directory, WEIGHTS_FILE)
    heads = HydraHeads(cfg)
    expected = heads.state_dict()
    state = {}
    for ours, theirs in _names(cfg).items():
        if theirs not in tensors:
            raise SpecDecodeError(f"the Hydra head {directory} lacks the weight {theirs}")
        if tensors[theirs].shape != expected[ours].shape:
            raise SpecDecodeError(
                f"the Hydra head {directory} has {theirs} of shape {list(tensors[theirs].shape)}, "
                f"its config says {list(expected[ours].shape)}"
            )
        state[ours] = tensors[theirs].float()
    heads.load_state_dict(state | {"target_ids": heads.target_ids})
    return heads.to(device=device, dtype=dtype).eval().requires_grad_(False)
