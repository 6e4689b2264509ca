"""Turning logits into the distribution that is sampled from.

The same function shapes the target's and the drafter's logits (temperature, then top-k, then
top-p), so the rejection test compares two distributions over the same support rules.
"""

from __future__ import annotations

import torch

from specdecode.config import SamplingParams


def shaped_probs(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p; rows sum to 1.

    logits: [..., V]. Returns float32 [..., V]. At temperature 0 the result is the one-hot of the
    argmax, the distribution greedy decoding samples from.
    """
    logits = logits.float()
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / sampling.temperature
    vocab_size = logits.shape[-1]
    if 0 < sampling.top_k < vocab_size:
        kth_largest = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass strictly
        # before it is still short of top_p, so the most likely token always stays.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from(probs: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    """One draw per row of `probs` [..., V] -> [...] int64."""
    flat = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat, 1, generator=rng).squeeze(-1)
    return draws.reshape(probs.shape[:-1])
