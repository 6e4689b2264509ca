"""A tiny random Hugging Face model, for tests of loading paths that need no real weights."""

from __future__ import annotations

from pathlib import Path

import torch

#: The smallest registry model: the tiny model borrows its tokenizer.
TOKENIZER_SOURCE = "smollm2-135m-instruct"


def save_tiny_llama(directory: Path):
    """Save a 2-layer random Llama as transformers saves it, with a real tokenizer, into
    `directory` (a Hugging Face directory that loads in a second); return the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from specdecode import models

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    (directory / "tokenizer.json").write_text(models.load_tokenizer(TOKENIZER_SOURCE).to_json())
    return model
