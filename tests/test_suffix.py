"""The `suffix` drafter (SuffixDecoding) and its index.

- The index: the longest match of a context's suffix and the counts of what followed it; a
  memory bound that evicts the oldest sequences and keeps what is left searchable; a saved index
  loads back, and one of another tokenizer or an unreadable file is refused in one line.
- Greedy losslessness on a real model, chains and trees, with drafts accepted: a request that
  repeats an earlier one drafts from the cross-request index, which lives as long as the engine.
- Sampling: `certify` passes at temperature 1 (slow).
"""

from __future__ import annotations

import pytest
from certified import assert_certify_passes

from specdecode import SamplingParams, SpecConfig, SpecDecoder
from specdecode.drafters.suffix import SuffixDrafter
from specdecode.drafters.suffix_index import SuffixIndex
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget


def test_the_longest_match_and_what_followed_it() -> None:
    index = SuffixIndex()
    index.add_sequence([1, 2, 3, 4, 1, 2, 3, 5, 9, 2, 3, 4])
    matched, ends = index.longest_match([7, 1, 2, 3], max_length=8)
    assert matched == 3 and len(ends) == 2  # "1 2 3" occurred twice; "7 1 2 3" never
    assert [(token, following.size) for token, following in index.children(ends)] == [
        (4, 1),
        (5, 1),
    ]
    # "2 3" occurred three times, followed by 4 twice and 5 once: most frequent first.
    matched, ends = index.longest_match([8, 2, 3], max_length=8)
    assert matched == 2 and len(ends) == 3
    assert [(t, f.size) for t, f in index.children(ends)] == [(4, 2), (5, 1)]
    assert index.longest_match([6], max_length=8) == (0, pytest.approx([]))


def test_no_match_crosses_from_one_sequence_into_the_next() -> None:
    index = SuffixIndex()
    index.add_sequence([1, 2])
    index.add_sequence([3, 4])
    matched, ends = index.longest_match([2, 3], max_length=4)
    assert matched == 1  # "3" matches; "2 3" spans two sequences
    assert [token for token, _ in index.children(ends)] == [4]
    assert index.longest_match([9, 2], max_length=4)[0] == 0  # "2" ends its sequence


def test_the_memory_bound_evicts_the_oldest_sequences() -> None:
    index = SuffixIndex(max_tokens=1000)
    for request in range(300):
        index.add_sequence([request % 50 + 100, 7, 8, 9, request])
        assert index.num_tokens <= 1000
    assert index.nbytes < 64 * 1000  # the buffer and position lists stay near the bound
    # The newest requests are still found, the oldest are gone.
    assert index.longest_match([299 % 50 + 100, 7, 8, 9], max_length=8)[0] == 4
    matched, ends = index.longest_match([100, 7, 8, 9], max_length=8)
    # 200 requests of 5 tokens fit: requests 0 and 50 (followed by 0 and 50) were evicted.
    assert sorted(token for token, _ in index.children(ends)) == [100, 150, 200, 250]
    one_long = SuffixIndex(max_tokens=10)
    one_long.add_sequence(list(range(100)))
    assert one_long.num_tokens == 10
    assert one_long.longest_match([95, 96], max_length=4)[0] == 2
    assert one_long.longest_match([5, 6], max_length=4)[0] == 0


def test_a_saved_index_loads_back_and_another_tokenizers_is_refused(tmp_path) -> None:
    index = SuffixIndex()
    index.add_sequence([1, 2, 3, 4])
    index.add_sequence([5, 2, 3, 6])
    path = tmp_path / "suffix.npz"
    index.save(path, "vocab-a")
    loaded = SuffixIndex.load(path, "vocab-a", max_tokens=None)
    matched, ends = loaded.longest_match([2, 3], max_length=4)
    assert matched == 2 and sorted(t for t, _ in loaded.children(ends)) == [4, 6]
    with pytest.raises(SpecDecodeError, match="another tokenizer"):
        SuffixIndex.load(path, "vocab-b", max_tokens=None)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00\x01 not an index")
    with pytest.raises(SpecDecodeError, match="cannot read the suffix cache"):
        SuffixIndex.load(garbage, "vocab-a", max_tokens=None)


def test_bad_options_are_one_clear_error(tmp_path) -> None:
    for options in ({"max_depth": 0}, {"min_token_prob": 2.0}, {"max_cached_tokens": -1}):
        with pytest.raises(SpecDecodeError, match="suffix needs"):
            SuffixDrafter(**options)
    with pytest.raises(SpecDecodeError, match="not a directory"):
        SuffixDrafter(cache_file=str(tmp_path / "missing" / "c.npz"), vocabulary="v")


def test_a_match_of_m_tokens_drafts_at_most_m_by_default() -> None:
    drafter = SuffixDrafter(max_cached_tokens=0)
    drafter.begin([1, 2, 3, 4, 5, 6, 7, 1, 2], SamplingParams(), None)
    tree = drafter.propose([1, 2, 3, 4, 5, 6, 7, 1, 2], Budget.chain(8))
    assert tree.tokens.tolist() == [3, 4]  # "1 2" matched: two tokens
    tree = drafter.propose([1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5], Budget.chain(8))
    assert tree.tokens.tolist() == [6, 7, 1, 2, 3]


@pytest.fixture(scope="module")
def llm() -> SpecDecoder:
    return SpecDecoder.load("smollm2-135m-instruct")


PROMPTS = [
    "Write a Python function that returns the squares of a list of numbers.",
    "Write a Python function that returns the cubes of a list of numbers.",
    "Write a Python function that returns the squares of a list of numbers.",
]


@pytest.mark.parametrize("tree", ["chain", "static"])
def test_greedy_is_exact_and_learns_across_requests(llm: SpecDecoder, tree: str) -> None:
    llm.engine.drafter_state.clear()
    sampling = SamplingParams(max_new_tokens=48)
    spec = SpecConfig(drafter="suffix", tree=tree, controller="fixed", num_draft_tokens=8)
    results = []
    for prompt in PROMPTS:
        plain = llm.generate(prompt, sampling, SpecConfig(drafter="none"))
        fast = llm.generate(prompt, sampling, spec)
        assert fast.token_ids == plain.token_ids, prompt
        results.append(fast.stats.mean_accepted_tokens)
    # The third request repeats the first: its answer is in the cross-request index.
    assert results[2] > 3.0
    assert results[2] > results[0]


def test_the_cross_request_index_keeps_its_bound(llm: SpecDecoder) -> None:
    llm.engine.drafter_state.clear()
    spec = SpecConfig(drafter="suffix", drafter_options={"max_cached_tokens": 100})
    for i in range(6):
        llm.generate(f"Count to {i + 3}.", SamplingParams(max_new_tokens=30), spec)
    (index,) = llm.engine.drafter_state.values()
    assert 0 < index.num_tokens <= 100


@pytest.mark.slow
def test_sampling_passes_certify(llm: SpecDecoder) -> None:
    assert_certify_passes(llm, SpecConfig(drafter="suffix", controller="fixed", num_draft_tokens=4))


def test_the_bench_shares_learning_within_a_session_only(llm: SpecDecoder) -> None:
    """Two requests of one session: the second drafts from the first's answer. The same two as
    lone prompts, or a repeat of a prompt: nothing learned carries over."""
    from specdecode.bench.methods import parse_methods
    from specdecode.bench.runner import Runner
    from specdecode.bench.suites import Prompt

    text = "Write a Python function that returns the squares of a list of numbers."
    prompts = [
        Prompt("s-1", "sessions", text, session="s"),
        Prompt("s-2", "sessions", text, session="s"),
        Prompt("alone-1", "alone", text),
        Prompt("alone-2", "alone", text),
    ]
    runner = Runner(llm, parse_methods("suffix"), SamplingParams(max_new_tokens=40))
    records = {(r.method, r.prompt_id, r.repeat): r for r in runner.run(prompts, repeats=2)}
    learned = records[("suffix", "s-2", 0)].mean_accepted_tokens
    assert learned > 3.0
    for key in [("suffix", "alone-2", 0), ("suffix", "s-1", 1), ("suffix", "alone-1", 1)]:
        assert records[key].mean_accepted_tokens < learned / 2, key
    assert all(r.exact is not False for r in records.values())
    assert [records[("suffix", p, 0)].session_index for p in ("s-1", "s-2", "alone-1")] == [
        1,
        2,
        None,
    ]
    from specdecode.bench.report import report

    text = report(list(records.values()), "bench")
    assert "| method | request 1 | request 2 |" in text
    first, second = (records[("suffix", p, r)] for p, r in (("s-1", 0), ("s-2", 0)))
    by_index = [
        (first.new_tokens + records[("suffix", "s-1", 1)].new_tokens)
        / (first.target_forwards + records[("suffix", "s-1", 1)].target_forwards),
        (second.new_tokens + records[("suffix", "s-2", 1)].new_tokens)
        / (second.target_forwards + records[("suffix", "s-2", 1)].target_forwards),
    ]
    assert f"| suffix | {by_index[0]:.2f} | {by_index[1]:.2f} |" in text


def test_the_sessions_suite_keeps_each_session_in_one_category_and_in_order() -> None:
    from specdecode.bench.runner import _categories_in_turn
    from specdecode.bench.suites import load_suite

    prompts = load_suite("sessions")
    sessions: dict[str, list[str]] = {}
    for prompt in _categories_in_turn(prompts):  # the order a bench runs them in
        assert prompt.session, prompt.id
        sessions.setdefault(prompt.session, []).append(prompt.id)
    assert len(sessions) == 8
    for session, ids in sessions.items():
        assert ids == [f"{session}-{i}" for i in range(1, 6)]
        assert len({p.category for p in prompts if p.session == session}) == 1
