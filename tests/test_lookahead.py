"""The `lookahead` drafter (lookahead decoding).

- The window is a tree below the root: the oldest level a chain, each later guess the child of
  the previous level's guess one position back, so a node's depth is its position.
- Each verification's predictions at the latest level become the next level (the oldest dropped
  once the window is full), and each diagonal plus its prediction becomes a pooled n-gram, which
  is drafted when its first token is the last committed one.
- Bad input (no tree, a window past the context, bad sizes) is one clear error before decoding.
- Greedy losslessness on a real model, with drafts accepted.
"""

from __future__ import annotations

import pytest
import torch
from certified import assert_certify_passes

from specdecode import SamplingParams, SpecConfig, SpecDecoder
from specdecode.cli import main
from specdecode.drafters.base import TargetOutput
from specdecode.drafters.lookahead import LookaheadDrafter
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget
from specdecode.verify.base import Verdict

BUDGET = Budget(max_depth=5, max_width=4, max_nodes=16)


def verify(drafter: LookaheadDrafter, num_nodes: int, predict) -> None:
    """A verification whose row r predicts `predict(r)` (row 0 is the root)."""
    logits = torch.zeros(num_nodes + 1, 64)
    for row in range(num_nodes + 1):
        logits[row, predict(row)] = 1.0
    drafter.update(Verdict([], [0], num_nodes, False), TargetOutput(logits))


def test_the_window_is_a_tree_and_each_iteration_adds_a_level_and_ngrams() -> None:
    drafter = LookaheadDrafter(window=3, ngram=3, guesses=2)
    drafter.begin([1, 2, 3, 4, 5], SamplingParams(), None)
    first = drafter.propose([1, 2, 3, 4, 5], BUDGET)
    assert first.tokens.tolist() == [3, 4, 5]  # the first level, from the prompt: a chain
    assert first.parents.tolist() == [-1, 0, 1]
    verify(drafter, 3, lambda row: 10 + row)  # positions 1, 2, 3 predicted as 11, 12, 13
    second = drafter.propose([1, 2, 3, 4, 5, 6], BUDGET)
    assert second.tokens.tolist() == [3, 4, 5, 11, 12, 13]
    # Level 1's guess at position p hangs below level 0's at p - 1: depth is position.
    assert second.parents.tolist() == [-1, 0, 1, 0, 1, 2]
    assert second.depths.tolist() == [1, 2, 3, 2, 3, 4]
    verify(drafter, 6, lambda row: 20 + row)  # level 1's nodes (rows 4-6) predict 24, 25, 26
    # The window is full (ngram - 1 = 2 levels): the oldest is dropped, and the diagonals
    # (3, 11), (4, 12), (5, 13) with their predictions are pooled as trigrams.
    assert drafter.levels == [[11, 12, 13], [24, 25, 26]]
    assert drafter.pool == {3: [(11, 24)], 4: [(12, 25)], 5: [(13, 26)]}
    # After a committed 4, its trigram is drafted first, then the window.
    third = drafter.propose([1, 2, 3, 4], BUDGET)
    assert third.tokens.tolist()[:2] == [12, 25] and third.parents.tolist()[:2] == [-1, 0]
    assert third.num_nodes == 2 + 6


def test_a_tight_budget_narrows_the_window() -> None:
    drafter = LookaheadDrafter(window=4, ngram=3, guesses=0)
    drafter.begin([7, 8, 9, 10], SamplingParams(), None)
    verify(drafter, drafter.propose([7, 8, 9, 10], BUDGET).num_nodes, lambda row: row)
    tree = drafter.propose([7, 8, 9, 10, 1], Budget(max_depth=3, max_width=4, max_nodes=16))
    assert tree.num_nodes == 2 * 2 and int(tree.depths.max()) <= 3  # 2 levels x 2 positions
    verify(drafter, tree.num_nodes, lambda row: 30 + row)
    assert drafter.levels[-1][:2] == [33, 34]  # the narrow level's predictions, then the old


def test_bad_input_is_one_clear_error_before_decoding(capsys) -> None:
    with pytest.raises(SpecDecodeError, match="window >= 1"):
        LookaheadDrafter(window=0)
    with pytest.raises(SpecDecodeError, match="past the model's context"):
        LookaheadDrafter(window=60, ngram=5, max_context=64)
    code = main(["generate", "--model", "smollm2-135m-instruct", "--drafter", "lookahead", "hi"])
    assert code == 2
    assert "add --tree static" in capsys.readouterr().err


@pytest.fixture(scope="module")
def llm() -> SpecDecoder:
    return SpecDecoder.load("smollm2-135m-instruct")


def test_greedy_is_exact_with_guesses_accepted(llm: SpecDecoder) -> None:
    sampling = SamplingParams(max_new_tokens=96)
    prompt = "List the numbers from 1 to 30, one per line, each followed by its square."
    plain = llm.generate(prompt, sampling, SpecConfig(drafter="none"))
    spec = SpecConfig(
        drafter="lookahead",
        tree="static",
        tree_nodes=16,
        controller="fixed",
        num_draft_tokens=5,
    )
    fast = llm.generate(prompt, sampling, spec)
    assert fast.token_ids == plain.token_ids
    assert fast.stats.mean_accepted_tokens > 1.2


@pytest.mark.slow
def test_sampling_passes_certify(llm: SpecDecoder) -> None:
    spec = SpecConfig(
        drafter="lookahead", tree="static", tree_nodes=16, controller="fixed", num_draft_tokens=5
    )
    assert_certify_passes(llm, spec)
