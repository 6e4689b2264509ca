"""The architecture description the compact `torch` transformer is built from.

One flat dataclass covers the Llama / Qwen2 family and the Gemma 3 family; the loaders fill it from
a GGUF file's metadata or a Hugging Face `config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerConfig:
    family: str  # "llama" (Llama, Qwen2, SmolLM) or "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q, k, v
    # Gemma 3 only
    rope_local_base_freq: float = 10000.0
    sliding_window: int | None = None
    sliding_window_pattern: int = 6  # every n-th layer is global, the others sliding
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    rope_scaling_factor: float = 1.0  # linear scaling of the global rope (Gemma 3 >= 4B)

    def __post_init__(self) -> None:
        if self.family not in ("llama", "gemma3"):
            raise ValueError(f"unsupported transformer family {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    def is_sliding_layer(self, layer: int) -> bool:
        if self.family != "gemma3" or self.sliding_window is None:
            return False
        return (layer + 1) % self.sliding_window_pattern != 0
