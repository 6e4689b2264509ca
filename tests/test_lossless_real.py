"""Losslessness on real models: speculative output equals plain decoding, token for token.

Greedy: every drafter and tree shape, on real prompts, with the default 0.5B model and with the
1.5B target / 0.5B draft pair, gives exactly the token ids of `--drafter none` on the same backend
and dtype. The default tier keeps the 0.5B's tests (prompt lookup, a draft model chain and a tree);
the 1.5B pair, every controller and the other shapes and verifiers are in the slow tier.
Sampling: the rejection verifier keeps the real model's next-token distributions.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from scipy.stats import chisquare
from significance import ALPHA

from specdecode import GenerationResult, SamplingParams, SpecConfig, SpecDecoder
from specdecode.drafters.draft_model import DraftModelDrafter
from specdecode.sampling import sample_from, shaped_probs
from specdecode.tree import Budget, DraftTree
from specdecode.verify.rejection import RejectionVerifier

SMALL = "qwen2.5-coder-0.5b-instruct"
LARGE = "qwen2.5-coder-1.5b-instruct"

EDIT_PROMPT = (
    "Add type hints to this function and return the full code.\n\n```python\n"
    "def mean_and_spread(values):\n"
    "    if not values:\n"
    "        raise ValueError('empty input')\n"
    "    total = sum(values)\n"
    "    mean = total / len(values)\n"
    "    spread = max(values) - min(values)\n"
    "    return mean, spread\n```"
)
QUESTION_PROMPT = "Write a Python function that checks if a number is prime."


def generate(llm: SpecDecoder, prompt: str, drafter: str, tokens: int, **spec) -> GenerationResult:
    sampling = SamplingParams(max_new_tokens=tokens)
    return llm.generate(prompt, sampling, SpecConfig(drafter=drafter, **spec))


@pytest.fixture(scope="module")
def small() -> SpecDecoder:
    return SpecDecoder.load(SMALL)


def plain_runs(llm: SpecDecoder) -> Callable[[str, int], list[int]]:
    """Plain greedy decoding's token ids, run once per prompt at the longest length asked for:
    a shorter greedy run is a prefix of a longer one (it stops at the same end-of-text)."""
    runs: dict[str, list[int]] = {}

    def token_ids(prompt: str, tokens: int) -> list[int]:
        if prompt not in runs or len(runs[prompt]) < tokens:
            runs[prompt] = generate(llm, prompt, "none", max(tokens, 64)).token_ids
        return runs[prompt][:tokens]

    return token_ids


@pytest.fixture(scope="module")
def plain_small(small: SpecDecoder) -> Callable[[str, int], list[int]]:
    return plain_runs(small)


@pytest.mark.parametrize(
    ("prompt", "controller"),
    [
        (EDIT_PROMPT, "cost-aware"),
        pytest.param(QUESTION_PROMPT, "heuristic", marks=pytest.mark.slow),
        pytest.param(EDIT_PROMPT, "heuristic", marks=pytest.mark.slow),
        pytest.param(EDIT_PROMPT, "fixed", marks=pytest.mark.slow),
        pytest.param(QUESTION_PROMPT, "fixed", marks=pytest.mark.slow),
        pytest.param(QUESTION_PROMPT, "cost-aware", marks=pytest.mark.slow),
        (EDIT_PROMPT, "tree"),
    ],
)
def test_prompt_lookup_greedy_is_exact(
    small: SpecDecoder, plain_small, prompt: str, controller: str
) -> None:
    plain = plain_small(prompt, 64)  # one target forward per token
    if controller == "tree":  # copies of every occurrence, merged into a tree
        fast = generate(small, prompt, "prompt-lookup", 64, tree="static")
    else:
        fast = generate(small, prompt, "prompt-lookup", 64, controller=controller)
    assert fast.token_ids == plain
    # Drafts were accepted, so the identity is not plain decoding's by default: on the edit the
    # answer repeats the prompt; the question's answer repeats itself (names, `return`). The
    # cost-aware controller may rightly draft nothing where little can be copied.
    if (prompt, controller) != (QUESTION_PROMPT, "cost-aware"):
        assert fast.stats.target_forwards < len(plain)


@pytest.fixture(scope="module")
def self_pair(small: SpecDecoder) -> SpecDecoder:
    """The 0.5B in float32 drafting for itself in bfloat16: close, but rejections do happen.
    (Plain decoding of the pair is the 0.5B's own: the draft model takes no part in it.)"""
    draft = SpecDecoder.load(SMALL, dtype="float32")
    return SpecDecoder(small.target, small.tokenizer, draft_model=draft.target)


def test_draft_model_greedy_is_exact_same_family_other_dtype(
    small: SpecDecoder, self_pair: SpecDecoder, plain_small
) -> None:
    plain = plain_small(EDIT_PROMPT, 48)
    # The heuristic controller: a float32 draft costs a bfloat16 target forward, so the
    # cost-aware one would rightly draft little, and the assertion below needs drafts.
    fast = generate(self_pair, EDIT_PROMPT, "draft-model", 48, controller="heuristic")
    assert fast.token_ids == plain
    assert fast.stats.mean_accepted_tokens > 1.5
    # It does stop early: a very doubtful draft model proposes short drafts.
    doubtful = DraftModelDrafter(
        self_pair.draft_model, small.target.vocab_size, min_confidence=0.999
    )
    doubtful.begin([], SamplingParams(), None)
    context = small.encode_prompt(QUESTION_PROMPT)
    assert doubtful.propose(context, Budget.chain(8)).num_nodes < 8


@pytest.mark.slow
def test_draft_model_greedy_is_exact_on_both_prompts_early_stops_and_trees(
    small: SpecDecoder, self_pair: SpecDecoder, plain_small
) -> None:
    for prompt in (EDIT_PROMPT, QUESTION_PROMPT):
        plain = plain_small(prompt, 48)
        # The heuristic controller: a float32 draft costs a bfloat16 target forward, so the
        # cost-aware one would rightly draft little, and the assertion below needs drafts.
        fast = generate(self_pair, prompt, "draft-model", 48, controller="heuristic")
        assert fast.token_ids == plain
        assert fast.stats.mean_accepted_tokens > 1.5
        # Stopping a draft early on the draft model's own doubt changes nothing either.
        adaptive = generate(
            self_pair,
            prompt,
            "draft-model",
            48,
            controller="heuristic",
            drafter_options={"min_confidence": 0.4},
        )
        assert adaptive.token_ids == plain
    # A tree of drafts (EAGLE-2's dynamic tree) through the same pair, verified in one forward.
    tree = generate(self_pair, EDIT_PROMPT, "draft-model", 32, tree="dynamic", tree_nodes=8)
    assert tree.token_ids == plain_small(EDIT_PROMPT, 32)
    assert tree.stats.mean_accepted_tokens > 1.5


@pytest.mark.slow
def test_draft_model_with_a_partial_vocabulary_greedy_is_exact() -> None:
    """A draft that scores only 2048 common tokens plus the special ones and those it was fed
    proposes worse drafts, never another output."""
    llm = SpecDecoder.load(SMALL, draft_model=SMALL, draft_vocabulary=2048)
    for prompt in (EDIT_PROMPT, QUESTION_PROMPT):
        plain = generate(llm, prompt, "none", 40)
        # heuristic: a draft as big as the target rarely pays, and cost-aware would rightly stop
        # drafting, while this test needs drafts
        fast = generate(llm, prompt, "draft-model", 40, controller="heuristic")
        assert fast.token_ids == plain.token_ids
        assert fast.stats.mean_accepted_tokens > 1.5
    # Only scored tokens are ever proposed: the common ones, the special ones, the fed ones.
    drafter = DraftModelDrafter(llm.draft_model, llm.target.vocab_size)
    drafter.begin([], SamplingParams(), None)
    context = llm.encode_prompt(QUESTION_PROMPT)
    scored = set(range(2048)) | set(context) | llm.tokenizer.special_token_ids
    assert set(drafter.propose(context, Budget.chain(8)).tokens.tolist()) <= scored


@pytest.fixture(scope="module")
def pair() -> SpecDecoder:
    return SpecDecoder.load(LARGE, draft_model=SMALL)


@pytest.fixture(scope="module")
def plain_pair(pair: SpecDecoder) -> Callable[[str, int], list[int]]:
    return plain_runs(pair)


@pytest.mark.slow
def test_draft_model_greedy_is_exact_on_the_1p5b_0p5b_pair(pair: SpecDecoder, plain_pair) -> None:
    for prompt in (EDIT_PROMPT, QUESTION_PROMPT):
        plain = plain_pair(prompt, 40)
        for controller in ("heuristic", "fixed"):
            fast = generate(pair, prompt, "draft-model", 40, controller=controller)
            assert fast.token_ids == plain, controller
        assert fast.stats.acceptance_histogram[0] < fast.stats.target_forwards


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["static", "dynamic", "iid", "without-replacement", "delayed"])
def test_tree_drafts_greedy_are_exact_on_the_1p5b_0p5b_pair(
    shape: str, pair: SpecDecoder, plain_pair
) -> None:
    """One target forward over a whole draft tree; the greedy walk keeps plain decoding's
    tokens (this rests on tree attention giving each node its path's bits)."""
    for prompt in (EDIT_PROMPT, QUESTION_PROMPT):
        fast = generate(pair, prompt, "draft-model", 32, tree=shape, tree_width=2, tree_nodes=12)
        assert fast.token_ids == plain_pair(prompt, 32), prompt
        assert fast.stats.mean_accepted_tokens > 1.5


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["prompt-lookup", "draft-model"])
def test_greedy_is_exact_with_the_amx_tile_kernel(
    drafter: str, pair: SpecDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `SPECDECODE_TILES=1` on an AMX CPU every product of the target's bfloat16 rows takes
    the tile kernel, which rounds its own way: plain decoding and speculation, both through it,
    still agree token for token (chains and a tree)."""
    from specdecode.backends.torch import kernels

    if kernels.rowwise_linear_tiles() is None:
        pytest.skip("needs a CPU with AMX tile instructions (Intel Sapphire Rapids or later)")
    monkeypatch.setitem(kernels._state, "tiles_chosen", True)
    for prompt in (EDIT_PROMPT, QUESTION_PROMPT):
        plain = generate(pair, prompt, "none", 40)
        fast = generate(pair, prompt, drafter, 40, controller="heuristic")
        assert fast.token_ids == plain.token_ids, prompt
        assert fast.stats.target_forwards < plain.stats.target_forwards  # drafts were accepted
        if drafter == "draft-model":
            tree = generate(pair, prompt, drafter, 40, tree="dynamic", tree_width=2, tree_nodes=12)
            assert tree.token_ids == plain.token_ids, prompt
            assert tree.stats.mean_accepted_tokens > 1.5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "verifier"),
    [
        ("iid", "specinfer"),
        ("iid", "spectr"),
        ("without-replacement", "rrs-without-replacement"),
        ("without-replacement", "traversal"),
        ("static", "lossy-typical"),
    ],
)
def test_sampling_verifiers_at_temperature_zero_are_exact(
    shape: str, verifier: str, pair: SpecDecoder, plain_pair
) -> None:
    """At temperature 0 every verifier sees one-hot targets and must keep plain greedy decoding's
    tokens (lossy-typical included: only the argmax passes its threshold)."""
    fast = generate(
        pair, EDIT_PROMPT, "draft-model", 24, tree=shape, tree_nodes=8, verifier=verifier
    )
    assert fast.token_ids == plain_pair(EDIT_PROMPT, 24)
    assert fast.stats.mean_accepted_tokens > 1.5


def real_distributions(llm: SpecDecoder, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and draft logits over the `vocab` most likely tokens of two real contexts.

    The target is the model after an open-ended prompt; the "drafter" is the same model after a
    similar prompt, a realistic near-miss. Restricting both to a shared set of likely tokens
    keeps the test fast while the shapes of the distributions stay the model's own.
    """

    def last_logits(text: str) -> torch.Tensor:
        ids = llm.encode_prompt(text, chat=False)
        llm.target.prefill(ids)
        return llm.target.forward_tree(DraftTree.empty())[0].float()

    target = last_logits("Here is a random English word: ")
    draft = last_logits("A random word: ")
    keep = torch.topk(torch.softmax(target, -1) + torch.softmax(draft, -1), vocab).indices
    return target[keep], draft[keep]


@pytest.mark.parametrize(
    "sampling",
    [
        pytest.param(SamplingParams(temperature=1.0), id="t1"),
        pytest.param(
            SamplingParams(temperature=1.2, top_k=20, top_p=0.9),
            id="t1.2-topk-topp",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_rejection_keeps_real_next_token_distribution(small, sampling) -> None:
    target_logits, draft_logits = real_distributions(small)
    target_probs = shaped_probs(target_logits, sampling)
    draft_probs = shaped_probs(draft_logits, sampling)
    assert int((target_probs > 0).sum()) >= 5, "the test needs a spread-out distribution"
    verifier = RejectionVerifier()
    rng = torch.Generator().manual_seed(0)
    samples = 20_000
    counts = torch.zeros_like(target_probs, dtype=torch.float64)
    accepted = 0
    # Row 1 of the logits (after the draft) matters only for the bonus token; any row will do.
    logits = torch.stack([target_logits, target_logits])
    for _ in range(samples):
        draft = int(sample_from(draft_probs, rng))
        tree = DraftTree.chain([draft], draft_probs.unsqueeze(0))
        verdict = verifier.verify(tree, logits, sampling, rng)
        counts[verdict.tokens[0]] += 1
        accepted += verdict.num_accepted
    expected = target_probs.double() * samples
    assert counts[expected == 0].sum() == 0
    common = expected >= 5
    observed = torch.cat([counts[common], counts[~common].sum().reshape(1)])
    wanted = torch.cat([expected[common], expected[~common].sum().reshape(1)])
    keep = wanted > 0
    observed, wanted = observed[keep], wanted[keep]
    pvalue = chisquare(observed.numpy(), (wanted * observed.sum() / wanted.sum()).numpy()).pvalue
    assert pvalue > ALPHA
    # And the speculation is not vacuous: the acceptance rate is 1 - TV(p, q).
    tv = 0.5 * float((target_probs - draft_probs).abs().sum())
    assert abs(accepted / samples - (1 - tv)) < 0.02
