"""The llamacpp backend on the registry's real GGUF files.

- Tree attention through sequence ids: the logits at every node of one tree forward are those of
  running the node's root-to-node path as a chain, and a commit keeps exactly the accepted path.
- Greedy losslessness: every drafter and tree shape gives the token ids of `--drafter none` on the
  same backend.
- Sampling: a sampling verifier passes `certify` on this backend.
- Bad input: a file llama.cpp cannot load, a missing llama-cpp-python, a prompt longer than the
  context: one clear error.

The default tier keeps the narrow kernels on the 0.5B (bits in any batch, the tree forward, greedy
prompt lookup with drafts accepted), the negative control that llama.cpp's stock kernels fail the
same bits test, and the bad-input tests; the other kernels, trees, certify and the 1.5B are `slow`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from specdecode import SamplingParams, SpecConfig, SpecDecoder
from specdecode.backends import llamacpp_matched
from specdecode.backends.llamacpp import (
    ALLOW_AMX,
    COMPACTION_PAYBACK,
    NO_AMX_FLAGS,
    LlamaCppBackend,
    _Context,
    amx_error,
)
from specdecode.certify import CertifyConfig, certify
from specdecode.cli import CERTIFY_PROMPT
from specdecode.errors import SpecDecodeError
from specdecode.models import resolve_gguf
from specdecode.tree import DraftTree

SMALL = "qwen2.5-coder-0.5b-instruct"
TARGET = "qwen2.5-coder-1.5b-instruct"  # Q4_K and Q6_K weights only
EDIT_PROMPT = (
    "Rename the variable `total` to `running_sum` and return the full code.\n\n```python\n"
    "def mean(values):\n"
    "    total = 0\n"
    "    for value in values:\n"
    "        total += value\n"
    "    return total / len(values)\n```"
)
QUESTION_PROMPT = "Write a Python function that checks if a number is prime."


needs_matched = pytest.mark.skipif(
    not llamacpp_matched.loaded(),  # reserved in conftest.py, where this machine can run them
    reason=f"the matched kernels cannot run here: {llamacpp_matched.why_unavailable()}",
)


@pytest.fixture(scope="module")
def small() -> SpecDecoder:
    return SpecDecoder.load(SMALL, backend="llamacpp-narrow")


@pytest.fixture(
    scope="module",
    params=[
        "llamacpp-narrow",
        pytest.param("llamacpp-wide", marks=pytest.mark.slow),
        pytest.param("llamacpp-matched", marks=[needs_matched, pytest.mark.slow]),
    ],
)
def exact(request, small: SpecDecoder) -> SpecDecoder:
    """Each of the exact kernels: narrow and wide on the 0.5B, matched on the 1.5B (whose weights
    are all of the types the matched kernels cover; the 0.5B's are mostly not)."""
    if request.param == "llamacpp-narrow":
        return small
    if request.param == "llamacpp-matched":
        return SpecDecoder.load(TARGET, backend=request.param)
    return SpecDecoder.load(SMALL, backend=request.param)


@pytest.fixture(scope="module")
def pair(small: SpecDecoder) -> SpecDecoder:
    # The 0.5B drafts for itself through a second context: same weights, separate cache.
    draft = LlamaCppBackend(resolve_gguf(SMALL), max_context=4096)
    return SpecDecoder(small.target, small.tokenizer, draft_model=draft)


def _path_logits(backend: LlamaCppBackend, prompt: list[int], path: list[int]) -> torch.Tensor:
    backend.reset()
    backend.extend(prompt[:-1])
    logits = backend.forward(torch.tensor(prompt[-1:] + path))
    assert logits is not None
    return logits[-1]


def test_exact_kernels_compute_a_token_the_same_in_any_batch(exact: SpecDecoder) -> None:
    """Bit for bit, at a context past 512 cells (where llama.cpp's flash attention over a float16
    cache splits a single query's keys across threads), at batch sizes across every stock kernel
    switch (the repacked weights' groups of 4 rows, the tiled kernel's 8, flash attention's query
    tiles from 64), on every exact kernel."""
    backend = exact.target
    context = [1000 + (7 * i) % 5000 for i in range(600)]
    drafts = [3000 + i for i in range(70)]
    backend.reset()
    backend.extend(context)
    one_at_a_time = []
    for token in drafts:
        logits = backend.forward(torch.tensor([token]))
        assert logits is not None
        one_at_a_time.append(logits[0])
    expected = torch.stack(one_at_a_time)
    for count in (2, 3, 4, 5, 8, 9, 70):
        backend.truncate(len(context))
        batched = backend.forward(torch.tensor(drafts[:count]))
        assert batched is not None
        assert torch.equal(batched, expected[:count]), f"{count} tokens in one batch"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma-3-270m", "smollm2-135m-instruct"])
def test_narrow_kernels_are_exact_for_other_weight_types(model: str) -> None:
    """Q8_0, Q5_0 and Q4_1 weights (Gemma 3's and SmolLM2's files) beside K-quants: on x86,
    llama.cpp sends some of these types through tinyBLAS from 2 rows on."""
    backend = LlamaCppBackend(resolve_gguf(model), max_context=1024)
    context = [1000 + (7 * i) % 5000 for i in range(600)]
    drafts = [3000 + i for i in range(9)]
    backend.extend(context)
    expected = torch.stack([backend.forward(torch.tensor([token]))[0] for token in drafts])
    for count in (2, 3, 9):
        backend.truncate(len(context))
        assert torch.equal(backend.forward(torch.tensor(drafts[:count])), expected[:count]), count


@pytest.mark.slow
def test_a_tree_wider_than_a_piece_matches_its_paths(exact: SpecDecoder) -> None:
    """A 70-node tree goes through in pieces (of 3 rows narrow, 60 wide), each seeing the earlier
    ones as cached nodes: every node's logits still equal its path's, run as a chain."""
    backend = exact.target
    prompt = exact.encode_prompt(QUESTION_PROMPT)
    # a chain of 10 under the root, and 60 leaves hanging off its nodes in turn
    parents = list(range(-1, 9)) + [i % 10 for i in range(60)]
    tokens = [2000 + 3 * i for i in range(len(parents))]
    tree = DraftTree(torch.tensor(tokens), torch.tensor(parents))
    backend.prefill(prompt)
    tree_logits = backend.forward_tree(tree)
    for node in (0, 9, 10, 45, 69):
        path = [node]
        while parents[path[0]] >= 0:
            path.insert(0, parents[path[0]])
        expected = _path_logits(backend, prompt, [tokens[i] for i in path])
        assert torch.equal(tree_logits[node + 1], expected), f"node {node}"


def test_tree_forward_matches_each_path_and_commit_keeps_the_path(small: SpecDecoder) -> None:
    backend = small.target
    prompt = small.encode_prompt(QUESTION_PROMPT)
    #        root
    #       /    \
    #     n0      n1
    #    /  \      \
    #  n2    n3     n4
    #  |
    #  n5
    tokens = small.tokenizer.encode(" def is prime number check for all values")[:6]
    parents = [-1, -1, 0, 0, 1, 2]
    tree = DraftTree(torch.tensor(tokens), torch.tensor(parents))
    backend.prefill(prompt)
    tree_logits = backend.forward_tree(tree)  # [7, V]
    paths: list[list[int]] = [[]]
    for node, parent in enumerate(parents):
        paths.append((paths[parent + 1] if parent >= 0 else []) + [tokens[node]])
    for row, path in enumerate(paths):
        expected = _path_logits(backend, prompt, path)
        assert torch.equal(tree_logits[row], expected), f"node {row - 1}"

    # Accept n0 -> n2 -> n5 with a bonus token: the cache then holds exactly that chain.
    backend.prefill(prompt)
    backend.forward_tree(tree)
    bonus = int(tree_logits[6].argmax())
    backend.commit([0, 2, 5], bonus)
    after_commit = backend.forward(torch.tensor([bonus]))
    assert after_commit is not None
    assert backend.num_cached == len(prompt) + 4
    expected = _path_logits(backend, prompt, [tokens[0], tokens[2], tokens[5], bonus])
    assert torch.equal(after_commit[-1], expected)


@pytest.mark.parametrize(
    "prompt", [EDIT_PROMPT, pytest.param(QUESTION_PROMPT, marks=pytest.mark.slow)]
)
def test_prompt_lookup_greedy_is_exact(exact: SpecDecoder, prompt: str) -> None:
    sampling = SamplingParams(max_new_tokens=64)
    plain = exact.generate(prompt, sampling, SpecConfig(drafter="none"))
    results = {
        controller: exact.generate(
            prompt, sampling, SpecConfig(drafter="prompt-lookup", controller=controller)
        )
        for controller in ("heuristic", "cost-aware")
    }
    for controller, fast in results.items():
        assert fast.token_ids == plain.token_ids, controller
    if prompt is EDIT_PROMPT:
        # The answer repeats the prompt, and the heuristic controller drafts whatever verifying
        # costs: speculation must have happened. (The cost-aware one drafts only where it pays,
        # which on the narrow kernels, where 17 rows cost what 16 single ones do, is nowhere.)
        assert results["heuristic"].stats.target_forwards < plain.stats.target_forwards


@pytest.mark.slow
@pytest.mark.parametrize(
    "tree", ["chain", "static", "dynamic", "without-replacement", "iid", "delayed"]
)
def test_draft_model_greedy_is_exact_for_every_tree(pair: SpecDecoder, tree: str) -> None:
    sampling = SamplingParams(max_new_tokens=40)
    spec = SpecConfig(drafter="draft-model", tree=tree, num_draft_tokens=4, controller="fixed")
    for prompt in (EDIT_PROMPT, QUESTION_PROMPT):
        plain = pair.generate(prompt, sampling, SpecConfig(drafter="none"))
        fast = pair.generate(prompt, sampling, spec)
        assert fast.token_ids == plain.token_ids, prompt
        # The draft is the target's own weights: nearly everything is accepted.
        assert fast.stats.mean_accepted_tokens > 2.5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("drafter", "tree", "verifier"),
    [
        ("prompt-lookup", "chain", "rejection"),
        ("draft-model", "iid", "spectr"),
        ("draft-model", "without-replacement", "traversal"),
    ],
)
def test_sampling_verifiers_pass_certify(
    pair: SpecDecoder, drafter: str, tree: str, verifier: str
) -> None:
    """An end-to-end check on llama.cpp, not a sensitive one: at 200 samples per side and
    certify's level of 0.01, on a law shaped like these continuations (a dozen outcomes, 0.3 down
    to 0.01), the test rejects a total-variation distance of 0.13 half the time and 0.19 nine times
    in ten; smaller errors pass. The verifiers' power tests are test_rejection_sampling.py and
    test_trees.py (exact laws), which run the same verifier code."""
    spec = SpecConfig(
        drafter=drafter, tree=tree, verifier=verifier, num_draft_tokens=3, controller="fixed"
    )
    prompt = pair.encode_prompt(CERTIFY_PROMPT, chat=False)
    sampling = SamplingParams(temperature=1.0)
    report = certify(pair.engine, prompt, sampling, spec, CertifyConfig(samples=200, seed=7))
    assert report.verdict == "PASS", report.summary()


def test_stock_kernels_compute_a_token_differently_in_a_batch(small: SpecDecoder) -> None:
    """The negative control of the bits test above: on llama.cpp's own kernels, a token verified
    among 4 or more rows gets other logits than decoded alone (the reason for the exact kernels),
    so that test can fail."""
    stock = SpecDecoder.load(SMALL, backend="llamacpp-stock").target
    context = [1000 + (7 * i) % 5000 for i in range(600)]
    drafts = [3000 + i for i in range(9)]
    stock.extend(context)
    alone = torch.stack([stock.forward(torch.tensor([token]))[0] for token in drafts])
    stock.truncate(len(context))
    batched = stock.forward(torch.tensor(drafts))
    assert not torch.equal(batched, alone)


def test_a_file_llama_cpp_cannot_load_is_one_clear_error(tmp_path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(SpecDecodeError, match="could not load"):
        LlamaCppBackend(bogus)


def test_missing_llama_cpp_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    hint = r'pip install --no-cache-dir "specdecode\[llamacpp\]"'
    with pytest.raises(SpecDecodeError, match=hint):
        SpecDecoder.load(SMALL, backend="llamacpp")


def test_a_build_with_amx_kernels_is_refused_unless_allowed() -> None:
    with_amx = "CPU : SSE3 = 1 | AVX512 = 1 | AMX_INT8 = 1 | OPENMP = 1 | REPACK = 1 |"
    problem = amx_error(with_amx, {})
    assert problem is not None and NO_AMX_FLAGS in problem and "\n" not in problem
    assert amx_error(with_amx, {ALLOW_AMX: "1"}) is None
    assert amx_error(with_amx.replace("AMX_INT8 = 1", "AMX_INT8 = 0"), {}) is None
    assert amx_error("CPU : SSE3 = 1 | AVX512 = 1 | OPENMP = 1 |", {}) is None


def test_prompt_longer_than_the_context_is_refused() -> None:
    backend = LlamaCppBackend(resolve_gguf(SMALL), max_context=32)
    assert backend.max_context >= 32  # llama.cpp rounds the context up (to 256 cells here)
    with pytest.raises(SpecDecodeError, match="shorten the prompt"):
        backend.prefill([100 + i % 50 for i in range(backend.max_context + 10)])


@pytest.mark.slow
def test_cli_generates_on_the_llamacpp_backend(capsys) -> None:
    from specdecode.cli import main

    argv = ["generate", QUESTION_PROMPT, "--backend", "llamacpp", "--max-new-tokens", "12"]
    assert main([*argv, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 12 and out["text"]
    # The stock kernels run too, with a warning that they are not guaranteed exact.
    assert main([*argv, "--kernels", "stock"]) == 0
    assert "use --kernels auto for exact output" in capsys.readouterr().err


def test_a_refused_tree_leaves_the_cache_as_it_was(small: SpecDecoder) -> None:
    backend = small.target
    prompt = small.encode_prompt(QUESTION_PROMPT)
    backend.prefill(prompt)
    cached = backend.num_cached
    before = backend.forward(torch.tensor(prompt[-1:]))
    backend.truncate(cached)
    free_ids = len(backend._llama.free_ids)
    # Two nodes at the same depth where the second sees the first: not a tree.
    bad_mask = torch.tensor([[True, False], [True, True]])
    with pytest.raises(SpecDecodeError, match="deeper"):
        backend.forward(torch.tensor([5, 6]), torch.tensor([cached, cached]), bad_mask)
    assert backend.num_cached == cached
    assert len(backend._llama.free_ids) == free_ids  # no sequence id leaked
    after = backend.forward(torch.tensor(prompt[-1:]))
    assert before is not None and after is not None and torch.equal(before, after)


def test_unknown_kernels_are_one_clear_error() -> None:
    with pytest.raises(SpecDecodeError, match="unknown llama.cpp kernels 'fast'; choose one of"):
        LlamaCppBackend(resolve_gguf(SMALL), kernels="fast")


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, kernels",
    [(SMALL, "narrow"), pytest.param(TARGET, "matched", marks=needs_matched)],
)
def test_kernels_are_exact_with_the_tiled_kernel_on(model: str, kernels: str) -> None:
    """A process that runs no wide kernels keeps llama.cpp's tiled kernel (it speeds prefill), as
    `--backend llamacpp` does, unlike the rest of this test process (whose wide kernels need it
    off). The narrow kernels' pieces stay below its 8 rows; the matched kernels' Q6_K dot product
    sums as it does. Both are exact there too; the wide kernels, asked for afterwards in that
    process, are refused in one line."""
    counts = (2, 3, 4, 5, 8, 9, 16, 17, 70)
    script = textwrap.dedent(
        f"""
        import os, torch
        from specdecode import SamplingParams, SpecConfig, SpecDecoder
        from specdecode.errors import SpecDecodeError
        llm = SpecDecoder.load({model!r}, backend="llamacpp")
        print(llm.target.kernels, "GGML_CPU_TILED_MM" in os.environ)
        sampling = SamplingParams(max_new_tokens=48)
        plain = llm.generate({EDIT_PROMPT!r}, sampling, SpecConfig(drafter="none"))
        fast = llm.generate({EDIT_PROMPT!r}, sampling, SpecConfig(drafter="prompt-lookup"))
        print("greedy", fast.token_ids == plain.token_ids)
        backend = llm.target
        context = [1000 + (7 * i) % 5000 for i in range(600)]
        drafts = [3000 + i for i in range(70)]
        backend.reset()
        backend.extend(context)
        expected = torch.stack([backend.forward(torch.tensor([t]))[0] for t in drafts])
        for count in {counts!r}:
            backend.truncate(len(context))
            batched = backend.forward(torch.tensor(drafts[:count]))
            print(count, torch.equal(batched, expected[:count]))
        try:
            SpecDecoder.load({SMALL!r}, backend="llamacpp-wide")
            print("wide kernels loaded")
        except SpecDecodeError as error:
            print(error)
        """
    )
    environment = {k: v for k, v in os.environ.items() if k != "GGML_CPU_TILED_MM"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3 + len(counts), result.stdout + result.stderr[-2000:]
    assert lines[:2] == [f"{kernels} False", "greedy True"]
    assert lines[2:-1] == [f"{count} True" for count in counts]
    assert "wide kernels need llama.cpp's tiled kernel off" in lines[-1]


@pytest.mark.slow
@needs_matched
def test_llamacpp_picks_the_matched_kernels_where_they_are_exact() -> None:
    target = SpecDecoder.load(TARGET, backend="llamacpp").target
    assert target.kernels == "matched"
    assert all(llamacpp_matched.used().values())  # both kernels in place of llama.cpp's
    with pytest.warns(RuntimeWarning, match="narrow exact kernels .*Q5_0, Q8_0 weights"):
        assert SpecDecoder.load(SMALL, backend="llamacpp").target.kernels == "narrow"
    with pytest.raises(SpecDecodeError, match="matched kernels are not exact for this file"):
        SpecDecoder.load(SMALL, backend="llamacpp-matched")


@pytest.mark.slow
@needs_matched
def test_matched_kernels_fall_back_to_narrow_when_a_batch_is_not_exact() -> None:
    """Without specdecode's kernels in place, llama.cpp's own sum a lone row in another order than
    a batch of 4 (or 8) or more: the check at load sees it and falls back."""
    script = textwrap.dedent(
        f"""
        import warnings
        from specdecode.backends import llamacpp, llamacpp_matched
        from specdecode.models import resolve_gguf
        llamacpp_matched.load = lambda: None  # the kernels are never put in place
        llamacpp_matched.loaded = lambda: True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backend = llamacpp.LlamaCppBackend(resolve_gguf({TARGET!r}), kernels="matched")
        print(backend.kernels)
        print(*[str(w.message) for w in caught])
        """
    )
    environment = {k: v for k, v in os.environ.items() if k != "GGML_CPU_TILED_MM"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "narrow", result.stdout
    assert "not exact with this llama.cpp" in lines[1]


# ---- several sequences in one cache (continuous batching) ----------------------------------------


@pytest.fixture(
    scope="module",
    params=[
        "narrow",
        pytest.param("wide", marks=pytest.mark.slow),
        pytest.param("matched", marks=[needs_matched, pytest.mark.slow]),
    ],
)
def shared(request) -> LlamaCppBackend:
    """A cache for three sequences, on each of the exact kernels (matched on the 1.5B)."""
    model = TARGET if request.param == "matched" else SMALL
    return LlamaCppBackend(
        resolve_gguf(model), max_context=1024, kernels=request.param, sequences=3
    )


# Per step, each sequence's draft (parents of its nodes) and the path it keeps; the sequences take
# them in turn, so one forward mixes chains, trees and a root alone.
STEPS = [
    ([-1, 0, 1], [0]),  # a chain of three, its first draft kept
    ([-1, -1, 0, 0, 2], [1]),  # a tree, a node among dropped ones kept
    ([], []),  # the root alone
    ([-1, 0, 1, 2], [0, 1, 2, 3]),  # a chain kept whole
    ([-1, -1, 1], [1, 2]),  # a tree whose second branch is kept
]


def _step_through(
    sequences: list[LlamaCppBackend], prompts: list[list[int]], batched: bool
) -> list[list[torch.Tensor]]:
    """Every sequence's logits through STEPS, verified together (`forward_trees`) or one sequence
    at a time; the cache compacted after the second step. Sequence k gets prompts[k], and drafts
    that depend on k and the step only."""
    seen: list[list[torch.Tensor]] = [[] for _ in sequences]
    for backend, prompt in zip(sequences, prompts, strict=True):
        backend.prefill(prompt)
    for step in range(len(STEPS)):
        trees, paths = [], []
        for prompt in prompts:
            index = len(prompt) % len(STEPS)  # which sequence this is, alone or batched
            parents, path = STEPS[(step + index) % len(STEPS)]
            tokens = [(4000 + 37 * step + 11 * index + node) for node in range(len(parents))]
            trees.append(
                DraftTree(
                    torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)
                )
            )
            paths.append(path)
        if batched:
            logits = sequences[0].forward_trees(sequences, trees)
        else:
            logits = [b.forward_tree(tree) for b, tree in zip(sequences, trees, strict=True)]
        for index, backend in enumerate(sequences):
            seen[index].append(logits[index])
            row = paths[index][-1] + 1 if paths[index] else 0
            backend.commit(paths[index], int(logits[index][row].argmax()))
        if step == 1:
            sequences[0]._llama.compact()
    return seen


def test_batched_sequences_get_the_bits_each_gets_alone(shared: LlamaCppBackend) -> None:
    """Three sequences verified in one forward per step (chains, trees and a lone root side by
    side; dropped nodes and rejected drafts left among the kept cells; a compaction in between):
    each gets, bit for bit, the logits of the same steps run on its own in an empty cache."""
    prompts = [[1000 + (7 * i + 13 * s) % 5000 for i in range(40 + s)] for s in range(3)]
    alone = [_step_through([shared], [prompt], batched=False)[0] for prompt in prompts]
    forks = [shared, shared.fork(), shared.fork()]
    together = _step_through(forks, prompts, batched=True)
    for index in range(3):
        for step, (got, expected) in enumerate(zip(together[index], alone[index], strict=True)):
            assert torch.equal(got, expected), f"sequence {index}, step {step}"
    with pytest.raises(SpecDecodeError, match="made for 3 sequences"):
        shared.fork()


def test_discarded_cells_stay_taken_until_a_compaction_pays(small: SpecDecoder) -> None:
    backend = small.target
    llama = backend._llama
    backend.prefill(small.encode_prompt(QUESTION_PROMPT))
    committed = backend.num_cached
    llama.compact()  # what earlier tests discarded
    assert llama.used == committed
    backend.forward(torch.arange(3000, 3020))  # drafts verified, then rejected
    backend.truncate(committed)
    assert llama.used == committed + 20  # rejected cells stay taken (see _Context)
    llama.compact()
    assert llama.used == committed
    # Rejected drafts again, then a forward wide enough that its steps over them would cost more
    # than copying the live cells: it compacts first.
    backend.forward(torch.arange(3000, 3020))
    backend.truncate(committed)
    wide = COMPACTION_PAYBACK * committed // 20 + 1
    backend.forward(torch.arange(3000, 3000 + wide), return_logits=False)
    assert llama.used == committed + wide


def test_freeing_cells_would_put_a_sequence_out_of_order(monkeypatch) -> None:
    """The negative control of the bits test: llama.cpp puts new tokens in the first free cells,
    so freeing rejected cells in place of discarding them (`_Context`) lets one sequence's next
    tokens land before its own earlier cells, and attention sums them in another order."""

    def free(self, sequence: int, start: int = -1, end: int = -1) -> None:
        self.lib.llama_memory_seq_rm(self.memory, sequence, start, end)

    monkeypatch.setattr(_Context, "discard", free)
    backend = LlamaCppBackend(resolve_gguf(SMALL), max_context=1024, kernels="narrow", sequences=3)
    with pytest.raises(AssertionError, match="sequence"):
        test_batched_sequences_get_the_bits_each_gets_alone(backend)


def test_batched_greedy_decoding_is_generates_output(small: SpecDecoder) -> None:
    """Five requests through three sequences of one cache (slots reused), prompt lookup under
    changing draft caps, the trees of all verified in one forward per step: each answer is
    token for token the one `generate` gives alone."""
    from test_batching import PROMPTS, run_batched

    backend = LlamaCppBackend(resolve_gguf(SMALL), max_context=1024, kernels="narrow", sequences=3)
    llm = SpecDecoder(backend, small.tokenizer)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    spec = SpecConfig(drafter="prompt-lookup", controller="fixed", num_draft_tokens=4)
    sampling = SamplingParams(max_new_tokens=24)
    batched, accepted = run_batched(llm.engine, prompts, lambda _: sampling, spec, batch=3)
    alone = [llm.engine.generate(p, sampling, SpecConfig(drafter="none"))[0] for p in prompts]
    assert batched == alone
    assert accepted > 0


def test_a_server_batches_as_many_requests_as_the_cache_holds(small: SpecDecoder) -> None:
    from specdecode.serve.metrics import ServerMetrics
    from specdecode.serve.scheduler import Scheduler

    backend = LlamaCppBackend(resolve_gguf(SMALL), max_context=256, kernels="narrow", sequences=2)
    llm = SpecDecoder(backend, small.tokenizer)
    scheduler = Scheduler(llm, ServerMetrics("m"), max_batch=8, forward_seconds=lambda rows: 0.03)
    assert scheduler.max_batch == 2


def test_sequence_ids_are_refused_before_a_batch_and_returned_by_a_dropped_fork() -> None:
    import gc

    backend = LlamaCppBackend(resolve_gguf(SMALL), max_context=256, kernels="narrow", sequences=2)
    llama = backend._llama
    fork = backend.fork()
    prompt = [1000 + 7 * i for i in range(12)]
    backend.prefill(prompt)
    fork.prefill(prompt)
    free = len(llama.free_ids)
    star = free // 2 + 4  # two trees of this many nodes need more ids than are free
    wide = DraftTree(torch.arange(3000, 3000 + star), torch.full((star,), -1, dtype=torch.long))
    with pytest.raises(SpecDecodeError, match="sequence ids"):
        backend.forward_trees([backend, fork], [wide, wide])
    assert len(llama.free_ids) == free
    assert backend.num_cached == fork.num_cached == len(prompt) - 1
    # A fork dropped while it holds a tree gives back its chain's id and its nodes'.
    small_tree = DraftTree(torch.tensor([3000, 3001]), torch.tensor([-1, -1]))
    fork.forward_tree(small_tree)
    assert len(llama.free_ids) == free - 3  # the root and two nodes
    del fork
    gc.collect()
    assert len(llama.free_ids) == free + 1
