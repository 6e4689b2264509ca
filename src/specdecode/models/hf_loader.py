"""Loading a local Hugging Face model directory (config.json, *.safetensors, tokenizer.json)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specdecode.errors import SpecDecodeError
from specdecode.models.config import TransformerConfig
from specdecode.models.tokenizer import Tokenizer

LLAMA_LIKE = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}
GEMMA3 = {"Gemma3ForCausalLM"}


def config_from_hf(hf: dict) -> TransformerConfig:
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in LLAMA_LIKE | GEMMA3:
        raise SpecDecodeError(
            f"architecture {arch} is not supported by the torch backend; try --backend hf"
        )
    gemma = arch in GEMMA3
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    return TransformerConfig(
        family="gemma3" if gemma else "llama",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=hf.get("rope_theta") or rope.get("rope_theta", 10000.0),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=arch == "Qwen2ForCausalLM" or hf.get("attention_bias", False),
        rope_local_base_freq=hf.get("rope_local_base_freq", 10000.0),
        sliding_window=hf.get("sliding_window") if gemma else None,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if gemma else None,
        final_logit_softcapping=hf.get("final_logit_softcapping") if gemma else None,
        rope_scaling_factor=float(scaling.get("factor", 1.0)) if gemma else 1.0,
    )


def hf_tokenizer(directory: Path) -> Tokenizer:
    tok_file = directory / "tokenizer.json"
    if not tok_file.is_file():
        raise SpecDecodeError(f"{directory} has no tokenizer.json")
    tok_config = {}
    if (directory / "tokenizer_config.json").is_file():
        tok_config = json.loads((directory / "tokenizer_config.json").read_text())
    gen_config = {}
    if (directory / "generation_config.json").is_file():
        gen_config = json.loads((directory / "generation_config.json").read_text())
    from tokenizers import Tokenizer as HFTokenizer

    raw = tok_file.read_text()
    vocab = HFTokenizer.from_str(raw).get_vocab(with_added_tokens=True)

    def token_text(value) -> str | None:
        return value.get("content") if isinstance(value, dict) else value

    eos = gen_config.get("eos_token_id", [])
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    eos_token = token_text(tok_config.get("eos_token"))
    if eos_token in vocab:
        eos_ids.add(vocab[eos_token])
    bos_token = token_text(tok_config.get("bos_token"))
    meta = {
        "eos_token_ids": sorted(eos_ids),
        "bos_token_id": vocab.get(bos_token) if bos_token else None,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "chat_template": tok_config.get("chat_template"),
    }
    return Tokenizer(raw, meta)


def load_hf_directory(directory: Path, dtype: torch.dtype):
    from safetensors.torch import load_file

    from specdecode.models import Checkpoint

    config = config_from_hf(json.loads((directory / "config.json").read_text()))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise SpecDecodeError(f"{directory} has no .safetensors weights")
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        state_dict.update({k: v.to(dtype) for k, v in load_file(str(file)).items()})
    return Checkpoint(str(directory), directory, config, state_dict, hf_tokenizer(directory))
