"""`shaped_probs` against references that do not share its code.

The statistical tests of the verifiers compare samples with distributions that `shaped_probs`
builds, so a bug in it (top-k keeping one token too few, top-p applied before temperature) would
shape both sides alike and pass there. Here it meets transformers' logits processors, which
implement the same rules independently, and cases small enough to work out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specdecode.config import SamplingParams
from specdecode.sampling import shaped_probs


def transformers_probs(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:  # [B, V]
    """transformers' sampling pipeline, in the order `generate` applies it."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    scores = warpers(torch.zeros(logits.shape[0], 1, dtype=torch.long), logits.double())
    return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.7, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.8, top_p=0.5),
        SamplingParams(temperature=1.3, top_k=40, top_p=0.8),
        SamplingParams(temperature=0.7, top_k=3, top_p=0.95),
    ],
    ids=lambda s: f"t{s.temperature}-k{s.top_k}-p{s.top_p}",
)
def test_shaped_probs_agree_with_transformers_logits_processors(sampling: SamplingParams) -> None:
    logits = torch.randn(64, 200, generator=torch.Generator().manual_seed(0)) * 3  # [B, V]
    ours = shaped_probs(logits, sampling).double()
    theirs = transformers_probs(logits, sampling)
    assert torch.equal(ours > 0, theirs > 0), "a different set of tokens can be sampled"
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_temperature_divides_the_logits() -> None:
    logits = torch.tensor([0.0, math.log(2.0)])  # probabilities 1/3, 2/3 at temperature 1
    assert shaped_probs(logits, SamplingParams(temperature=1.0)).tolist() == pytest.approx(
        [1 / 3, 2 / 3]
    )
    # At temperature 0.5 the odds square: 1 : 4.
    assert shaped_probs(logits, SamplingParams(temperature=0.5)).tolist() == pytest.approx(
        [1 / 5, 4 / 5]
    )


def test_top_k_keeps_every_token_tied_with_the_kth() -> None:
    logits = torch.tensor([2.0, 1.0, 1.0, 0.0, 1.0, -3.0])
    probs = shaped_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    # The second-largest logit is shared by three tokens: all of them stay (as in transformers).
    weights = [math.e**2, math.e, math.e, 0.0, math.e, 0.0]
    assert probs.tolist() == pytest.approx([w / sum(weights) for w in weights])
    probs = shaped_probs(logits, SamplingParams(temperature=1.0, top_k=1))
    assert probs.tolist() == pytest.approx([1, 0, 0, 0, 0, 0])


FLATTENED_MASS = sum(math.sqrt(p) for p in (0.5, 0.3, 0.2))


@pytest.mark.parametrize(
    ("temperature", "top_p", "expected"),
    [
        # 0.5 and 0.3 come before the last token, and 0.5 + 0.3 >= 0.75: it is cut.
        (1.0, 0.75, [0.5 / 0.8, 0.3 / 0.8, 0.0]),
        # The most likely token alone when it covers top-p.
        (1.0, 0.4, [1.0, 0.0, 0.0]),
        (1.0, 0.85, [0.5, 0.3, 0.2]),
        # Temperature first: at 2 the probabilities flatten to 0.416 / 0.322 / 0.263, the mass
        # before the last token (0.737) is short of 0.75, and all three stay.
        (2.0, 0.75, [math.sqrt(p) / FLATTENED_MASS for p in (0.5, 0.3, 0.2)]),
    ],
)
def test_top_p_keeps_the_smallest_likeliest_set_reaching_p_after_temperature(
    temperature: float, top_p: float, expected: list[float]
) -> None:
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    probs = shaped_probs(logits, SamplingParams(temperature=temperature, top_p=top_p))
    assert probs.tolist() == pytest.approx(expected, abs=1e-6)


def test_greedy_is_the_one_hot_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    assert shaped_probs(logits, SamplingParams()).tolist() == [[0, 1, 0], [1, 0, 0]]


def test_top_p_cuts_a_token_whose_predecessors_reach_p_exactly() -> None:
    """Powers of two sum exactly: the mass before the third token is 0.75, which reaches top-p
    0.75, so it goes (transformers cuts it too: its ascending sum up to it is 0.25 <= 1 - p)."""
    logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    probs = shaped_probs(logits, SamplingParams(temperature=1.0, top_p=0.75))
    assert probs.tolist() == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0], abs=1e-6)
    theirs = transformers_probs(logits[None], SamplingParams(temperature=1.0, top_p=0.75))[0]
    assert torch.equal(probs > 0, theirs > 0)
