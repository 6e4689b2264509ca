"""The `token-recycling` drafter: successors recycled from the verification forwards' logits.

- The matrix: a verification's rows (the root, then the verified nodes) set the successors of
  their tokens to the logits' top candidates; a chain follows the first candidates, a tree grows
  best first by the ranks' learned acceptance within the budget; an unseen row drafts nothing.
- Bounded state: the matrix and rank counts do not grow with the requests served.
- Greedy losslessness on a real model, chains and trees, with drafts accepted once the matrix is
  warm; a control that recycles each row's logits for the wrong token drafts far worse (the
  acceptance comes from the recycled rankings, not from the test's text).
- Sampling: `certify` passes at temperature 1 (slow).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from certified import assert_certify_passes

from specdecode import SamplingParams, SpecConfig, SpecDecoder
from specdecode.drafters.base import NO_TARGET_OUTPUT, TargetOutput
from specdecode.drafters.token_recycling import TokenRecyclingDrafter
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget
from specdecode.verify.base import Verdict

VOCAB = 20


def logits_ranking(*rankings: list[int]) -> torch.Tensor:
    """[len(rankings), VOCAB] logits whose top tokens are each ranking, in order."""
    logits = torch.zeros(len(rankings), VOCAB)
    for row, ranking in enumerate(rankings):
        for rank, token in enumerate(ranking):
            logits[row, token] = 10.0 - rank
    return logits


def test_a_verification_fills_the_matrix_and_a_chain_follows_it() -> None:
    drafter = TokenRecyclingDrafter(VOCAB, candidates=2)
    assert drafter.propose([5], Budget.chain(4)).num_nodes == 0  # nothing seen yet
    # The root 5 alone verified: its successors are 7, then 3.
    drafter.update(Verdict([], [7], 0, True), TargetOutput(logits_ranking([7, 3])))
    assert drafter.state.successors[5].tolist() == [7, 3]
    drafter.update(Verdict([], [9], 0, True), TargetOutput(logits_ranking([9, 1])))  # stale rows
    assert drafter.state.successors[5].tolist() == [7, 3]  # nothing proposed: no rows to map
    tree = drafter.propose([5], Budget.chain(4))
    assert tree.tokens.tolist() == [7] and tree.is_chain  # 7 has no row yet
    # Verifying [7]: row 0 is the root 5's, row 1 the node 7's.
    drafter.update(Verdict([0], [7, 8], 1, True), TargetOutput(logits_ranking([7, 3], [8, 2])))
    assert drafter.state.successors[7].tolist() == [8, 2]
    assert drafter.propose([5], Budget.chain(4)).tokens.tolist() == [7, 8]


def test_a_tree_grows_the_likeliest_ranks_within_its_budget() -> None:
    drafter = TokenRecyclingDrafter(VOCAB, candidates=3, tree=True)
    successors = drafter.state.successors
    successors[1] = [2, 3, 4]
    successors[2] = [5, 6, 7]
    successors[3] = [8, 9, 10]
    successors[5] = [11, 12, 13]
    tree = drafter.propose([1], Budget(max_depth=3, max_width=2, max_nodes=5))
    # Prior acceptance by rank 0.5, 0.15: 2 (0.5), 5 (0.25), 3 (0.15), 11 (0.125), 6 (0.075).
    assert tree.tokens.tolist() == [2, 5, 3, 11, 6]
    assert tree.parents.tolist() == [-1, 0, -1, 1, 0]
    assert tree.confidence.tolist() == pytest.approx([0.5, 0.5, 0.15, 0.5, 0.15])
    # Verified, with 2 and 5 accepted: ranks of the tries under accepted parents are counted.
    tries, hits = drafter.state.tries.copy(), drafter.state.hits.copy()
    logits = logits_ranking([2], [5], [8], [9], [11], [12])
    drafter.update(Verdict([0, 1], [2, 5, 12], 5, False), TargetOutput(logits))
    # Nodes 2, 3 (rank 0 and 1 under the root), 5 and 6 (under accepted 2), 11 (under accepted
    # 5): rank 0 tried 3 times, accepted twice (11 was not); rank 1 tried twice, never accepted.
    assert (drafter.state.tries - tries).tolist() == [3, 2, 0]
    assert (drafter.state.hits - hits).tolist() == [2, 0, 0]
    # Each row went to its own token: the root 1's to 1, node 2's to 2, node 5's to 5, ...
    assert [int(drafter.state.successors[t, 0]) for t in (1, 2, 5, 3, 11, 6)] == [
        2,
        5,
        8,
        9,
        11,
        12,
    ]
    # A controller that cut the chain to 1 node: only the verified rows are recycled.
    assert drafter.propose([1], Budget.chain(3)).tokens.tolist() == [2, 5, 8]
    drafter.update(Verdict([0], [2, 4], 1, True), TargetOutput(logits_ranking([2, 4], [4, 0])))
    assert drafter.state.successors[2].tolist()[:2] == [4, 0]
    assert int(drafter.state.successors[5, 0]) == 8  # row 5 untouched by the cut


def test_the_state_is_bounded_by_the_vocabulary_not_the_requests() -> None:
    shared: dict = {}
    drafter = TokenRecyclingDrafter(VOCAB, candidates=4, shared=shared)
    size = drafter.state.nbytes
    assert size <= VOCAB * 4 * 4 + 2 * 4 * 8
    generator = torch.Generator().manual_seed(0)
    for request in range(200):
        again = TokenRecyclingDrafter(VOCAB, candidates=4, shared=shared)  # the next request
        assert again.state is drafter.state
        context = [request % VOCAB]
        for _ in range(10):
            tree = again.propose(context, Budget(max_depth=4, max_width=2, max_nodes=6))
            logits = torch.randn(tree.num_nodes + 1, VOCAB, generator=generator)
            again.update(Verdict([], [0], tree.num_nodes, False), TargetOutput(logits))
            context.append(int(logits[0].argmax()))
    assert drafter.state.nbytes == size and len(shared) == 1
    assert (drafter.state.successors >= 0).all()


def test_bad_options_are_one_clear_error() -> None:
    for options in ({"candidates": 0}, {"candidates": 65}, {"prior_weight": 0.0}):
        with pytest.raises(SpecDecodeError, match="token-recycling needs"):
            TokenRecyclingDrafter(VOCAB, **options)


@pytest.fixture(scope="module")
def llm() -> SpecDecoder:
    return SpecDecoder.load("smollm2-135m-instruct")


PROMPTS = [
    "Explain what a hash table is, in three sentences.",
    "Count from 1 to 20, separated by commas.",
    "Write a Python function that returns the squares of a list of numbers.",
]


def run_prompts(llm: SpecDecoder, spec: SpecConfig) -> float:
    """Tokens per forward over the prompts' second pass, each output checked against plain
    decoding's; the first pass warms the matrix, as earlier requests would on a server."""
    llm.engine.drafter_state.clear()
    sampling = SamplingParams(max_new_tokens=64)
    tokens = forwards = 0
    for turn in range(2):
        for prompt in PROMPTS:
            plain = llm.generate(prompt, sampling, SpecConfig(drafter="none"))
            fast = llm.generate(prompt, sampling, spec)
            assert fast.token_ids == plain.token_ids, prompt
            if turn == 1:
                tokens += fast.stats.new_tokens
                forwards += fast.stats.target_forwards
    return tokens / forwards


@pytest.mark.parametrize("tree", ["chain", "static"])
def test_greedy_is_exact_with_drafts_accepted(llm: SpecDecoder, tree: str) -> None:
    spec = SpecConfig(drafter="token-recycling", tree=tree, tree_width=4, tree_nodes=16)
    assert run_prompts(llm, spec) > (1.3 if tree == "chain" else 1.5)


def test_control_recycling_rows_for_the_wrong_tokens_drafts_far_worse(
    llm: SpecDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = SpecConfig(drafter="token-recycling", tree="static", tree_width=4, tree_nodes=16)
    right = run_prompts(llm, spec)
    original = TokenRecyclingDrafter.update

    def shifted(self, verdict, target=NO_TARGET_OUTPUT):
        if target.logits is not None:  # each row's logits credited to the token after it
            target = TargetOutput(torch.roll(target.logits, 1, dims=0), tokens=target.tokens)
        original(self, verdict, target)

    monkeypatch.setattr(TokenRecyclingDrafter, "update", shifted)
    wrong = run_prompts(llm, spec)
    assert wrong < 1.0 + (right - 1.0) / 2


def test_the_bench_keeps_the_matrix_across_prompts_of_a_repeat_only(llm: SpecDecoder) -> None:
    from specdecode.bench.methods import parse_methods
    from specdecode.bench.runner import Runner
    from specdecode.bench.suites import Prompt

    prompts = [Prompt(f"p{i}", "any", text) for i, text in enumerate(PROMPTS)]
    runner = Runner(llm, parse_methods("token-recycling"), SamplingParams(max_new_tokens=16))
    runner.run(prompts, repeats=2)
    states = {key: state for key, state in runner._drafter_states.items()}
    assert set(states) == {("token-recycling", "", 0), ("token-recycling", "", 1)}
    first, second = (next(iter(states[k].values())) for k in sorted(states))
    assert first is not second
    assert np.any(first.successors >= 0) and np.any(second.successors >= 0)


@pytest.mark.slow
def test_sampling_passes_certify(llm: SpecDecoder) -> None:
    assert_certify_passes(
        llm, SpecConfig(drafter="token-recycling", controller="fixed", num_draft_tokens=3)
    )
