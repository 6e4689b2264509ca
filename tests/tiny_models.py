"""Tiny models for tests: a random Hugging Face directory for loading paths, and a random torch
backend for drafters and training that need no real weights."""

from __future__ import annotations

from pathlib import Path

import torch

from specdecode.models.config import TransformerConfig

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


def to_hf_names(model, config: TransformerConfig) -> dict[str, torch.Tensor]:
    """The inverse of `Transformer.load_hf_state_dict`, for random test weights."""
    sd = {
        "model.embed_tokens.weight": model.embed.weight.detach(),
        "model.norm.weight": model.final_norm.detach(),
        "lm_head.weight": model.lm_head.weight.detach(),
    }
    d, h, kv = config.head_dim, config.num_heads, config.num_kv_heads
    for i, block in enumerate(model.blocks):
        pre = f"model.layers.{i}."
        q, k, v = block.qkv.weight.detach().split([h * d, kv * d, kv * d])
        sd |= {
            pre + "self_attn.q_proj.weight": q,
            pre + "self_attn.k_proj.weight": k,
            pre + "self_attn.v_proj.weight": v,
            pre + "self_attn.o_proj.weight": block.o.weight,
            pre + "input_layernorm.weight": block.input_norm,
            pre + "post_attention_layernorm.weight": block.post_attn_norm,
            pre + "mlp.down_proj.weight": block.down.weight,
        }
        gate, up = block.gate_up.weight.detach().chunk(2)
        sd |= {pre + "mlp.gate_proj.weight": gate, pre + "mlp.up_proj.weight": up}
        if config.family == "gemma3":
            sd |= {
                pre + "pre_feedforward_layernorm.weight": block.pre_mlp_norm,
                pre + "post_feedforward_layernorm.weight": block.post_mlp_norm,
                pre + "self_attn.q_norm.weight": block.q_norm,
                pre + "self_attn.k_norm.weight": block.k_norm,
            }
    return {k: v.detach().clone() for k, v in sd.items()}


def tiny_torch_backend(
    num_layers: int = 4,
    vocab_size: int = 64,
    seed: int = 0,
    max_context: int = 512,
    layer_std: float = 0.3,
):
    """A random float32 Llama-family `TorchBackend` (hidden 32), its weights drawn from `seed`:
    the embedding and output layer with standard deviation 0.3, the decoder layers' weights with
    `layer_std` (small: the next token depends mostly on the last, a learnable target)."""
    from specdecode.backends.torch import TorchBackend
    from specdecode.backends.torch.model import Transformer

    config = TransformerConfig(
        family="llama",
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
    )
    torch.manual_seed(seed)
    state = Transformer(config)
    for name, parameter in state.named_parameters():
        torch.nn.init.normal_(parameter, std=layer_std if name.startswith("blocks.") else 0.3)
    return TorchBackend(
        config, to_hf_names(state, config), dtype=torch.float32, max_context=max_context
    )


def examples_of(answers) -> list:
    """Training examples from `generate_answers`'s answers: each prompt and answer but the last
    token fed, the answer's predictions trained."""
    from specdecode.train.ttt import Example

    return [
        Example(
            answer.features,
            torch.tensor(answer.prompt + answer.answer[:-1]),
            answer.labels,
            torch.tensor([False] * (len(answer.prompt) - 1) + [True] * len(answer.answer)),
        )
        for answer in answers
    ]


def decode_greedily(target, drafter, prompt: list[int], count: int) -> list[int]:
    """`count` new tokens by greedy speculation with a drafter object of the test's own (the
    engine's step loop, by hand): propose a chain of up to 4, verify, commit, tell the drafter,
    handing it the hidden states it names."""
    from specdecode.config import SamplingParams
    from specdecode.drafters.base import TargetOutput
    from specdecode.tree import Budget
    from specdecode.verify.base import Verdict

    context = list(prompt)
    target.reset()
    target.capture_hidden(drafter.hidden_layers)
    target.prefill(context)
    drafter.begin(context, SamplingParams(), None, TargetOutput(hidden=target.prompt_hidden))
    while len(context) < len(prompt) + count:
        tree = drafter.propose(context, Budget.chain(4))
        logits = target.forward_tree(tree)
        accepted = []
        for node in range(tree.num_nodes):
            if int(logits[node].argmax()) != int(tree.tokens[node]):
                break
            accepted.append(node)
        next_token = int(logits[len(accepted)].argmax())
        target.commit(accepted, next_token)
        tokens = [int(tree.tokens[n]) for n in accepted] + [next_token]
        verdict = Verdict(accepted, tokens, tree.num_nodes, len(accepted) == tree.num_nodes)
        drafter.update(verdict, TargetOutput(hidden=target.last_hidden))
        context += tokens
    return context[len(prompt) : len(prompt) + count]
