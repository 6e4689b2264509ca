"""Reading GGUF files: architecture, dequantized weights under Hugging Face names, tokenizer.

GGUF conventions undone here (as transformers' GGUF loader does):
- llama-architecture files store the q/k projections permuted for llama.cpp's interleaved rope;
  we use the rotate-half convention, so the permutation is inverted;
- Gemma files store RMSNorm weights with the +1 of Gemma's `(1 + w)` folded in; it is taken out;
- a file without `output.weight` ties the output head to the token embedding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specdecode.errors import ModelIntegrityError, SpecDecodeError
from specdecode.models.config import TransformerConfig

SUPPORTED = ("llama", "qwen2", "gemma3")
# Bump when the conversion changes, so caches written by older code are not reused.
CONVERTER_VERSION = 2

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def open_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises many kinds of errors on a damaged file
        raise ModelIntegrityError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}); it may be truncated or "
            "corrupt: download it again"
        ) from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader, path: Path) -> TransformerConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED:
        raise SpecDecodeError(
            f"{path.name}: architecture {arch!r} is not supported by the torch backend "
            f"(supported: {', '.join(SUPPORTED)})"
        )
    meta = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    names = {t.name for t in reader.tensors}
    gemma = arch == "gemma3"
    return TransformerConfig(
        family="gemma3" if gemma else "llama",
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(meta("context_length")),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        sliding_window=int(meta("attention.sliding_window")) if gemma else None,
        query_pre_attn_scalar=float(head_dim) if gemma else None,
        rope_scaling_factor=float(meta("rope.scaling.factor", 1.0) or 1.0) if gemma else 1.0,
    )


def hf_name(gguf_name: str, family: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, layer, rest = gguf_name.split(".", 2)
    base, kind = rest.rsplit(".", 1)
    if base == "ffn_norm":  # the norm before the MLP
        mapped = "pre_feedforward_layernorm" if family == "gemma3" else "post_attention_layernorm"
    elif base == "post_attention_norm":
        mapped = "post_attention_layernorm"
    else:
        mapped = LAYER_NAMES[base]
    return f"model.layers.{layer}.{mapped}.{kind}"


def read_weights(
    reader, config: TransformerConfig, arch: str, dtype: torch.dtype, progress: bool = True
) -> dict[str, torch.Tensor]:
    import gguf

    weights: dict[str, torch.Tensor] = {}
    tensors = list(reader.tensors)
    for tensor in tqdm(
        tensors, desc="converting weights", unit="tensor", file=sys.stderr, disable=not progress
    ):
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        value = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
        name = hf_name(tensor.name, config.family)
        if arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_heads if "attn_q" in tensor.name else config.num_kv_heads
            rows = value.shape[0]
            value = (
                value.reshape(heads, rows // heads // 2, 2, *value.shape[1:])
                .swapaxes(1, 2)
                .reshape(value.shape)
            )
        if config.family == "gemma3" and tensor.name.endswith("norm.weight"):
            value = value - 1.0
        weights[name] = value.to(dtype)
    return weights


def architecture(reader) -> str:
    return str(_field(reader, "general.architecture"))


def tokenizer_metadata(reader) -> dict:
    """Special tokens and chat template, as the `Tokenizer` wants them."""
    tokens = reader.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(tokens.parts[i]).decode("utf-8", errors="replace") for i in tokens.data]
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eos_ids = {int(eos)} if eos is not None else set()
    # Chat models end a turn with their own token; stop there too.
    for end_of_turn in ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<|eot_id|>"):
        if end_of_turn in vocab:
            eos_ids.add(vocab.index(end_of_turn))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return {
        "eos_token_ids": sorted(eos_ids),
        "bos_token_id": None if bos is None else int(bos),
        "bos_token": None if bos is None else vocab[int(bos)],
        "eos_token": None if eos is None else vocab[int(eos)],
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "vocab_size": len(vocab),
    }
