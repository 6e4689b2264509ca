"""Kangaroo's adapter (Liu et al., NeurIPS 2024, "Kangaroo: Lossless Self-Speculative Decoding via
Double Early Exiting").

The self-draft model is the target's first `exit_layer` decoder layers (run on the target's own KV
cache), then this adapter, then the target's output layer. The adapter bridges the gap between the
shallow states and what the last layer would have given: one attention layer with a residual
(`input_norm`, `q/k/v/o_proj`, no MLP, as the paper's "one multi-head attention and two
normalization layers") and its own final norm (`norm`), whose output the target's output layer
scores. The attention keeps its own keys and values by position (`HeadCache`): the committed
tokens' come from the shallow states verification computes anyway.

The output layer is the target's, frozen, restricted to a draft vocabulary (the tokens most often
predicted in training, as for the other heads): drafting scores those rows only, verification runs
over the full vocabulary, so the trim costs speed, never output.

Checkpoint: `config.json` (`kangaroo_exit_layer`, the attention's shape, the target's sizes and a
`specdecode` entry with the draft vocabulary and how it was made) and
`kangaroo_adapter.safetensors` (`input_norm.weight`, `q_proj.weight`, `k_proj.weight`,
`v_proj.weight`, `o_proj.weight`, `norm.weight` and `lm_head.weight`, the target's rows for the
draft vocabulary, kept so that the adapter loads without reading the target's weights).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.errors import SpecDecodeError
from specdecode.heads.attention import GrowingRope, HeadCache, Projected, project
from specdecode.heads.checkpoint import read_config_json, read_weights, write_checkpoint
from specdecode.models.config import TransformerConfig

WEIGHTS_FILE = "kangaroo_adapter.safetensors"


def default_exit_layer(num_layers: int) -> int:
    """Kangaroo's choice for Vicuna-7B was layer 2 of 32: the shallowest exit, whose drafts cost
    least; on a smaller model the same fraction is at least one layer."""
    return max(1, round(2 * num_layers / 32))


@dataclass(frozen=True)
class KangarooConfig:
    """The adapter's shape, its exit layer and the target it was made for."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # the target's
    num_target_layers: int
    exit_layer: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    draft_vocab: tuple[int, ...] = ()  # target ids the output layer scores (training picks them)
    base_model: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.exit_layer < self.num_target_layers:
            raise SpecDecodeError(
                f"the adapter's exit layer must be 1 to {self.num_target_layers - 1} (the "
                f"target has {self.num_target_layers} layers), got {self.exit_layer}"
            )
        sizes = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim)
        if min(sizes) < 1:
            raise SpecDecodeError(
                f"the adapter's hidden size, heads, key-value heads and head size must be "
                f"positive, got {sizes}"
            )
        if self.num_heads % self.num_kv_heads:
            raise SpecDecodeError("the adapter's heads must be a multiple of its key-value heads")
        if any(not 0 <= t < self.vocab_size for t in self.draft_vocab):
            raise SpecDecodeError(
                f"the adapter's draft vocabulary must be target ids below {self.vocab_size}"
            )

    @classmethod
    def for_target(cls, target: TransformerConfig, exit_layer: int | None) -> KangarooConfig:
        """An adapter shaped like one of the target's attention layers, exiting at `exit_layer`
        (None: `default_exit_layer`)."""
        return cls(
            hidden_size=target.hidden_size,
            num_heads=target.num_heads,
            num_kv_heads=target.num_kv_heads,
            head_dim=target.head_dim,
            vocab_size=target.vocab_size,
            num_target_layers=target.num_layers,
            exit_layer=default_exit_layer(target.num_layers) if exit_layer is None else exit_layer,
            rope_theta=target.rope_theta,
            rms_norm_eps=target.rms_norm_eps,
        )

    def check_target(self, target: TransformerConfig, source: str) -> None:
        """Refuse, in one line naming the mismatch, an adapter made for another model."""
        ours = (self.hidden_size, self.vocab_size, self.num_target_layers)
        theirs = (target.hidden_size, target.vocab_size, target.num_layers)
        if ours != theirs:
            raise SpecDecodeError(
                f"the Kangaroo adapter {source} was trained for a model of hidden size, "
                f"vocabulary and layers {ours}, the target's are {theirs}: train one for it"
            )

    def to_json(self) -> dict[str, Any]:
        shape = asdict(self)
        extra = {"draft_vocab": list(shape.pop("draft_vocab")), **shape.pop("provenance")}
        return {
            "kangaroo_exit_layer": shape.pop("exit_layer"),
            "base_model_name_or_path": shape.pop("base_model"),
            **shape,
            "specdecode": extra,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any], path: Path) -> KangarooConfig:
        if "kangaroo_exit_layer" not in raw:
            raise SpecDecodeError(f"{path} is not a Kangaroo adapter (no kangaroo_exit_layer)")
        try:
            extra = dict(raw.get("specdecode") or {})
            vocab = extra.pop("draft_vocab")
            return cls(
                hidden_size=int(raw["hidden_size"]),
                num_heads=int(raw["num_heads"]),
                num_kv_heads=int(raw["num_kv_heads"]),
                head_dim=int(raw["head_dim"]),
                vocab_size=int(raw["vocab_size"]),
                num_target_layers=int(raw["num_target_layers"]),
                exit_layer=int(raw["kangaroo_exit_layer"]),
                rope_theta=float(raw["rope_theta"]),
                rms_norm_eps=float(raw["rms_norm_eps"]),
                draft_vocab=tuple(int(t) for t in vocab),
                base_model=str(raw.get("base_model_name_or_path", "")),
                provenance=extra,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecDecodeError(
                f"{path} is not a valid Kangaroo adapter config: {exc!r}"
            ) from None


class KangarooAdapter(nn.Module):
    """The adapter's weights and its step, split around attention (a `HeadCache` when drafting,
    causal attention over a whole sequence when training)."""

    def __init__(self, cfg: KangarooConfig) -> None:
        super().__init__()
        if not cfg.draft_vocab:
            raise SpecDecodeError("a Kangaroo adapter needs a draft vocabulary")
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.input_norm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.norm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, len(cfg.draft_vocab), bias=False).requires_grad_(False)
        self.register_buffer("target_ids", torch.tensor(cfg.draft_vocab, dtype=torch.long))
        self.scale = 1.0 / math.sqrt(d)
        self.rope = GrowingRope(cfg.head_dim, cfg.rope_theta)

    def project(
        self,
        states: torch.Tensor,  # [T, H] the target's states leaving the exit layer
        positions: torch.Tensor,  # [T]
    ) -> Projected:
        cfg, layers = self.cfg, (self.q_proj, self.k_proj, self.v_proj)
        x = self.input_norm(states)
        return project(
            x, layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.rope, positions
        )

    def finish(
        self,
        states: torch.Tensor,  # [T, H] the residual: the shallow states
        attended: torch.Tensor,  # [heads, T, D]
    ) -> torch.Tensor:  # [T, H] before the adapter's norm
        return states + self.o_proj(attended.transpose(0, 1).reshape(states.shape[0], -1))

    def step(
        self,
        cache: HeadCache,
        states: torch.Tensor,  # [T, H]
        positions: torch.Tensor,  # [T]
        visible: torch.Tensor | None = None,  # [T, S] over the cache's last S slots
    ) -> torch.Tensor:  # [T, H]
        """Append T rows to `cache` and run them (see `HeadCache.attend`)."""
        states = states.to(self.q_proj.weight.dtype)
        projected = self.project(states, positions)
        return self.finish(states, cache.attend(projected, self.scale, visible))

    def sequence(self, states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        """A whole sequence at once, each row seeing itself and the rows before (training)."""
        positions = torch.arange(states.shape[0], device=states.device)
        projected = self.project(states, positions)
        attended = F.scaled_dot_product_attention(
            projected.q, projected.k, projected.v, is_causal=True, scale=self.scale, enable_gqa=True
        )
        return self.finish(states, attended)

    def logits(self, out: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, draft_vocab]
        return self.lm_head(self.norm(out))

    def new_cache(self, max_len: int) -> HeadCache:
        weight = self.q_proj.weight
        return HeadCache(
            self.cfg.num_kv_heads, self.cfg.head_dim, max_len, weight.dtype, weight.device
        )


_WEIGHTS = ("input_norm", "q_proj", "k_proj", "v_proj", "o_proj", "norm", "lm_head")


def save_adapter(
    adapter: KangarooAdapter, directory: Path, dtype: torch.dtype = torch.bfloat16
) -> None:
    """Write config.json and the weights (whole or not at all)."""
    state = adapter.state_dict()
    tensors = {f"{name}.weight": state[f"{name}.weight"].to(dtype) for name in _WEIGHTS}
    write_checkpoint(directory, adapter.cfg.to_json(), WEIGHTS_FILE, tensors)


def load_adapter(
    directory: str | Path,
    target: TransformerConfig,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> KangarooAdapter:
    """Load an adapter for `target`, refusing one of another model or a damaged file."""
    directory = Path(directory).expanduser()
    cfg = KangarooConfig.from_json(read_config_json(directory), directory / "config.json")
    cfg.check_target(target, str(directory))
    tensors = read_weights(directory, WEIGHTS_FILE)
    adapter = KangarooAdapter(cfg)
    expected = adapter.state_dict()
    state = {"target_ids": adapter.target_ids}
    for name in _WEIGHTS:
        key = f"{name}.weight"
        if key not in tensors:
            raise SpecDecodeError(f"the Kangaroo adapter {directory} lacks the weight {key}")
        if tensors[key].shape != expected[key].shape:
            raise SpecDecodeError(
                f"the Kangaroo adapter {directory} has {key} of shape {list(tensors[key].shape)}, "
                f"its config says {list(expected[key].shape)}"
            )
        state[key] = tensors[key].float()
    adapter.load_state_dict(state)
    return adapter.to(device=device, dtype=dtype).eval().requires_grad_(False)
