"""The EAGLE-3 draft head (Li et al., 2025, "EAGLE-3: Scaling up Inference Acceleration of Large
Language Models via Training-Time Test"), in the checkpoint layout vLLM and SGLang load.

The head predicts the target's next tokens from the target's own hidden states. For the committed
token at position `i` it reads the hidden states entering three target layers (low, middle, high;
by default 2, L/2 and L-3 of L layers), fuses them with one linear layer (`fc`, 3H -> H) and pairs
the result with the embedding of token `i+1` (the target's own embedding table). One decoder layer
(`midlayer`, whose attention reads the pair concatenated, 2H wide: embedding first) turns the pair
into a hidden state `out_i`, whose logits over the draft vocabulary (`norm`, `lm_head`) predict
token `i+2`. A further draft step pairs `out_i` itself (no `fc`) with the drafted token, so the
head runs on without the target: its training (`specdecode.train.eagle`) feeds it its own outputs
the same way ("training-time test").

Draft vocabulary: `lm_head` scores the `draft_vocab_size` most frequent target tokens of the
training data; draft id `d` is target id `d + d2t[d]`, and `t2d[t]` says whether target token `t`
is in it. Verification runs over the full vocabulary, so a trimmed one costs speed, never output.

Checkpoint: `config.json` (architecture `LlamaForCausalLMEagle3`, `draft_vocab_size`,
`eagle_config.eagle_aux_hidden_state_layer_ids`, read as Hugging Face's `hidden_states[id]`, the
input of layer `id`, as vLLM does; SGLang reads explicit ids one layer later) and
`model.safetensors` with `fc.weight`, `midlayer.*`, `norm.weight`, `lm_head.weight`, `d2t` and
`t2d`. The token embedding is the target's and is not saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specdecode.errors import SpecDecodeError
from specdecode.heads.attention import GrowingRope, HeadCache, Projected, project
from specdecode.heads.checkpoint import (
    CONFIG_FILE,
    read_config_json,
    read_weights,
    write_checkpoint,
)
from specdecode.models.config import TransformerConfig

ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHTS_FILE = "model.safetensors"


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's and vLLM's choice: low, middle and high features."""
    return (2, num_layers // 2, num_layers - 3)


@dataclass(frozen=True)
class Eagle3Config:
    """The head's shape, and the target it was made for."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    aux_layers: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    #: What specdecode knows of how it was made (target, data, steps); kept in config.json.
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.aux_layers) != 3:
            raise SpecDecodeError(
                f"an EAGLE-3 head reads three target layers, this one names {list(self.aux_layers)}"
            )
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise SpecDecodeError(
                f"the draft vocabulary ({self.draft_vocab_size}) must be between 1 and the "
                f"target's vocabulary ({self.vocab_size})"
            )
        if min(self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads) < 1:
            raise SpecDecodeError("the head's sizes and head counts must be at least 1")
        if self.num_heads % self.num_kv_heads:
            raise SpecDecodeError("the head's attention heads must be a multiple of its KV heads")

    @classmethod
    def for_target(
        cls,
        target: TransformerConfig,
        draft_vocab_size: int,
        intermediate_size: int | None = None,
        aux_layers: tuple[int, ...] | None = None,
    ) -> Eagle3Config:
        """A head shaped like one layer of `target` (EAGLE-3's choice)."""
        if target.family != "llama":
            raise SpecDecodeError(
                f"EAGLE-3 heads are built for Llama / Qwen2 targets, not {target.family}"
            )
        return cls(
            hidden_size=target.hidden_size,
            intermediate_size=intermediate_size or target.intermediate_size,
            num_heads=target.num_heads,
            num_kv_heads=target.num_kv_heads,
            head_dim=target.head_dim,
            vocab_size=target.vocab_size,
            draft_vocab_size=min(draft_vocab_size, target.vocab_size),
            aux_layers=tuple(aux_layers or default_aux_layers(target.num_layers)),
            rms_norm_eps=target.rms_norm_eps,
            rope_theta=target.rope_theta,
            max_position_embeddings=target.max_position_embeddings,
        )

    def check_target(self, target: TransformerConfig, source: str) -> None:
        """Refuse, in one line naming the mismatch, a head made for another model."""
        if self.hidden_size != target.hidden_size:
            raise SpecDecodeError(
                f"the head {source} reads hidden states of size {self.hidden_size}, but the "
                f"target's are {target.hidden_size}: it was trained for another model"
            )
        if max(self.aux_layers) > target.num_layers:
            raise SpecDecodeError(
                f"the head {source} reads layers {list(self.aux_layers)}, but the target has "
                f"{target.num_layers}: it was trained for another model"
            )
        if self.vocab_size != target.vocab_size:
            raise SpecDecodeError(
                f"the head {source} predicts over a vocabulary of {self.vocab_size} tokens, the "
                f"target's has {target.vocab_size}: it was trained for another model"
            )

    def to_hf(self) -> dict[str, Any]:
        """config.json as vLLM and SGLang read EAGLE-3 heads."""
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "llama",
            "hidden_act": "silu",
            "num_hidden_layers": 1,
            "hidden_size": self.hidden_size,
            "target_hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "eagle_config": {
                "eagle_aux_hidden_state_layer_ids": list(self.aux_layers),
                "use_aux_hidden_state": True,
            },
            "specdecode": self.provenance,
        }

    @classmethod
    def from_hf(cls, config: dict[str, Any], num_target_layers: int | None) -> Eagle3Config:
        """Read a head's config.json (ours, or a published EAGLE-3 head's)."""
        eagle = config.get("eagle_config") or {}
        layers = eagle.get("eagle_aux_hidden_state_layer_ids") or config.get(
            "eagle_aux_hidden_state_layer_ids"
        )
        if layers is None:
            if num_target_layers is None:
                raise SpecDecodeError("the head names no target layers and the target is unknown")
            layers = default_aux_layers(num_target_layers)
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        vocab = int(config["vocab_size"])
        return cls(
            hidden_size=int(config.get("target_hidden_size") or hidden),
            intermediate_size=int(config["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads", heads)),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=vocab,
            draft_vocab_size=int(config.get("draft_vocab_size") or vocab),
            aux_layers=tuple(int(layer) for layer in layers),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
            provenance=dict(config.get("specdecode") or {}),
        )


class _Attention(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        width = 2 * cfg.hidden_size  # the embedding and the hidden state, concatenated
        self.q_proj = nn.Linear(width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)


class _MLP(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _MidLayer(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.self_attn = _Attention(cfg)
        self.mlp = _MLP(cfg)
        self.input_layernorm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)  # on the token embedding
        self.hidden_norm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)  # on the hidden state
        self.post_attention_layernorm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)


class Eagle3Head(nn.Module):
    """The head's weights and its step, split around attention (which the caller runs: over a KV
    cache when drafting, over the training-time test's layout when training)."""

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.midlayer = _MidLayer(cfg)
        self.norm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.rope = GrowingRope(cfg.head_dim, cfg.rope_theta)

    def set_draft_vocabulary(self, target_ids: torch.Tensor) -> None:  # [draft_vocab] sorted
        """Draft id `d` stands for target token `target_ids[d]`."""
        ids = torch.as_tensor(target_ids, dtype=torch.long)
        self.d2t.copy_(ids - torch.arange(ids.shape[0]))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def target_ids(self) -> torch.Tensor:  # [draft_vocab]: the target token of each draft id
        return self.d2t + torch.arange(self.d2t.shape[0], device=self.d2t.device)

    def fuse(self, features: torch.Tensor) -> torch.Tensor:  # [T, 3, H] -> [T, H]
        """The three target layers' states at a token, fused into one (`fc`)."""
        return self.fc(features.flatten(-2).to(self.fc.weight.dtype))

    def project(
        self,
        hidden: torch.Tensor,  # [T, H]: fused target features, or the head's own last output
        embeds: torch.Tensor,  # [T, H]: the target's embedding of the next token
        positions: torch.Tensor,  # [T]
    ) -> Projected:
        layer, cfg = self.midlayer, self.cfg
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)
        attn = layer.self_attn
        layers = (attn.q_proj, attn.k_proj, attn.v_proj)
        return project(
            x, layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.rope, positions
        )

    def finish(
        self,
        hidden: torch.Tensor,  # [T, H]: the step's input hidden state (the residual)
        attended: torch.Tensor,  # [heads, T, D]: attention output
    ) -> torch.Tensor:  # [T, H]: the step's output, before the final norm
        rows = hidden.shape[0]
        attended = attended.transpose(0, 1).reshape(rows, -1)
        x = hidden + self.midlayer.self_attn.o_proj(attended)
        return x + self.midlayer.mlp(self.midlayer.post_attention_layernorm(x))

    def logits(self, out: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, draft_vocab]
        return self.lm_head(self.norm(out))

    def step(
        self,
        cache: HeadCache,
        hidden: torch.Tensor,  # [T, H]
        embeds: torch.Tensor,  # [T, H]
        positions: torch.Tensor,  # [T]
        visible: torch.Tensor | None = None,  # [T, S] bool over the last S slots; None = causal
    ) -> torch.Tensor:  # [T, H]: outputs before the final norm
        """Append T pairs to `cache` and run them (see `HeadCache.attend`)."""
        projected = self.project(hidden, embeds, positions)
        return self.finish(hidden, cache.attend(projected, self.scale, visible))


# ---- checkpoints ------------------------------------------------------------------------------


def save_head(head: Eagle3Head, directory: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write config.json and model.safetensors (see `checkpoint.write_checkpoint`)."""
    tensors = {
        name: value.to(dtype) if value.is_floating_point() else value
        for name, value in head.state_dict().items()
    }
    write_checkpoint(directory, head.cfg.to_hf(), WEIGHTS_FILE, tensors)


def read_config(directory: Path, num_target_layers: int | None = None) -> Eagle3Config:
    path = directory / CONFIG_FILE
    config = read_config_json(directory)
    architectures = config.get("architectures") or []
    if not any("eagle3" in str(name).lower() for name in architectures):
        raise SpecDecodeError(
            f"{directory} is not an EAGLE-3 head (its architectures are {architectures})"
        )
    try:
        return Eagle3Config.from_hf(config, num_target_layers)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise SpecDecodeError(f"{path} is not a valid EAGLE-3 config: {exc!r}") from None


def load_head(
    directory: str | Path,
    target: TransformerConfig,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> Eagle3Head:
    """Load a head for `target`, refusing one made for another model or a damaged file."""
    directory = Path(directory).expanduser()
    cfg = read_config(directory, target.num_layers)
    cfg.check_target(target, str(directory))
    tensors = read_weights(directory, WEIGHTS_FILE)
    tensors.pop("embed_tokens.weight", None)  # published heads may carry the target's copy
    with torch.device("meta"):
        head = Eagle3Head(cfg)
    head = head.to_empty(device=device)
    if "d2t" in tensors:
        mapped = tensors["d2t"].long() + torch.arange(tensors["d2t"].shape[0])
        if mapped.numel() and (int(mapped.min()) < 0 or int(mapped.max()) >= cfg.vocab_size):
            raise SpecDecodeError(f"the head {directory} maps draft tokens outside the vocabulary")
        if "t2d" not in tensors:  # vLLM ignores t2d; some heads leave it out
            t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
            t2d[mapped] = True
            tensors["t2d"] = t2d
    if "d2t" not in tensors and cfg.draft_vocab_size == cfg.vocab_size:
        tensors["d2t"] = torch.zeros(cfg.vocab_size, dtype=torch.long)
        tensors["t2d"] = torch.ones(cfg.vocab_size, dtype=torch.bool)
    expected = head.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise SpecDecodeError(
            f"the head {directory} does not have an EAGLE-3 head's weights (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, value in tensors.items():
        if value.shape != expected[name].shape:
            raise SpecDecodeError(
                f"the head {directory} has {name} of shape {list(value.shape)}, its config says "
                f"{list(expected[name].shape)}"
            )
    head.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    return head.to(dtype=dtype).eval().requires_grad_(False)
