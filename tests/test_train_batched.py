"""Batched self-distillation (`train/batched.py`): each answer is the target's greedy answer, as if
generated alone, and its features are those the target's own forward computes."""

from __future__ import annotations

import torch

from specdecode.train.batched import generate_answers
from tests.tiny_models import tiny_torch_backend

LAYERS = (1, 2, 4)
NEW_TOKENS = 12


def _plain_greedy(target, prompt: list[int], new_tokens: int) -> list[int]:
    """One token per forward through the backend, argmax each time."""
    target.reset()
    with torch.inference_mode():
        logits = target.forward(torch.tensor(prompt))
        answer = [int(logits[-1].argmax())]
        while len(answer) < new_tokens:
            logits = target.forward(torch.tensor(answer[-1:]))
            answer.append(int(logits[-1].argmax()))
    return answer


def _prompts(count: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    lengths = (5, 17, 9, 30, 3, 12, 21)
    return [
        torch.randint(0, vocab, (lengths[k % len(lengths)],), generator=generator).tolist()
        for k in range(count)
    ]


def test_batched_answers_are_each_prompts_plain_greedy_answer() -> None:
    target = tiny_torch_backend(num_layers=4, vocab_size=64, seed=4)
    prompts = _prompts(7, target.vocab_size)
    reference = [_plain_greedy(target, p, NEW_TOKENS) for p in prompts]
    # A stop token that ends some answers early: answers stop right after it.
    stop = reference[0][3]
    expected = [r[: r.index(stop) + 1] if stop in r else r for r in reference]
    assert any(len(e) < NEW_TOKENS for e in expected) and any(
        len(e) == NEW_TOKENS for e in expected
    )
    finished: list[int] = []
    for batch in (1, 3):
        answers = generate_answers(
            target.model,
            prompts,
            NEW_TOKENS,
            frozenset({stop}),
            LAYERS,
            batch=batch,
            on_answer=lambda index, answer: finished.append(index),
        )
        assert [a.answer for a in answers] == expected, f"batch {batch}"
        assert [a.prompt for a in answers] == prompts
    assert sorted(finished) == sorted(list(range(7)) * 2)


def test_batched_features_and_labels_are_the_targets_own() -> None:
    target = tiny_torch_backend(num_layers=4, vocab_size=64, seed=4)
    prompts = _prompts(5, target.vocab_size)
    answers = generate_answers(target.model, prompts, NEW_TOKENS, frozenset(), LAYERS, batch=2)
    target.capture_hidden(LAYERS)
    for made in answers:
        fed = made.prompt + made.answer[:-1]
        target.reset()
        target.take_captured()
        with torch.inference_mode():
            logits = target.forward(torch.tensor(fed))
        features = target.take_captured()  # [T, 3, H]
        assert made.features.shape == features.shape
        # bfloat16 storage: a relative error of at most 2^-8 per value
        torch.testing.assert_close(made.features.float(), features, rtol=1e-2, atol=1e-2)
        answer_rows = slice(len(made.prompt) - 1, None)
        assert made.labels[answer_rows].tolist() == logits[answer_rows].argmax(-1).tolist()
        assert made.labels[answer_rows].tolist() == made.answer
        assert made.labels[: len(made.prompt) - 1].tolist() == made.prompt[1:]
    target.capture_hidden(())
