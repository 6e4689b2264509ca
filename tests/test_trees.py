"""Token trees on the toy model: every shape's greedy output is plain decoding's, trees really
branch, and each tree verifier keeps the target's distribution (chi-square against the exact
joint law of a short sequence), while deliberately broken verifiers fail the same test."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from scripts import load_benchmark_script
from significance import ALPHA, BROKEN
from test_rejection_sampling import LENGTH, VOCAB, chi_square_pvalue, exact_joint, markov_table
from toy import ToyBackend, ToyTokenizer, plain_greedy

from specdecode.config import SamplingParams, SpecConfig
from specdecode.engine import Engine
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget, DraftTree
from specdecode.trees import TREE_SHAPES, make_tree_shape
from specdecode.verify import make_verifier
from specdecode.verify.rrs_without_replacement import RecursiveRejectionVerifier
from specdecode.verify.specinfer import SpecInferVerifier, residual
from specdecode.verify.spectr import SpecTrVerifier
from specdecode.verify.traversal import TraversalVerifier

SHAPES = sorted(TREE_SHAPES)


def toy_tree_run(shape: str):
    target = ToyBackend(seed=1, vocab_size=6)
    draft = ToyBackend(seed=1, order=2, vocab_size=6)  # agrees with the target now and then
    engine = Engine(target, ToyTokenizer(), draft_model=draft)
    tree = {} if shape == "chain" else {"tree": shape, "tree_width": 2, "tree_nodes": 6}
    spec = SpecConfig(drafter="draft-model", controller="fixed", num_draft_tokens=3, **tree)
    return engine.generate([0, 1, 2], SamplingParams(max_new_tokens=40), spec)


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_tree_decoding_matches_plain_decoding(shape: str) -> None:
    ids, _, stats = toy_tree_run(shape)
    assert ids == plain_greedy(ToyBackend(seed=1, vocab_size=6), [0, 1, 2], 40)
    assert stats.drafted_tokens <= 6 * stats.target_forwards
    # Branching pays: at least as many tokens per forward as the chain of the same depth, and
    # more where the tree branches at its first level (the delayed tree, a single path for its
    # first two tokens, branches only at depth 3 and gains nothing over the chain on this toy).
    chain = toy_tree_run("chain")[2]
    assert stats.mean_accepted_tokens >= chain.mean_accepted_tokens > 1.0
    if shape != "delayed":
        assert stats.mean_accepted_tokens > chain.mean_accepted_tokens


def test_trees_branch_and_respect_the_budget() -> None:
    torch.manual_seed(0)
    draft = ToyBackend(seed=2, vocab_size=8)
    for name in SHAPES:
        shape = make_tree_shape(name)
        for sampling in (SamplingParams(), SamplingParams(temperature=1.0)):
            draft.reset()
            draft.forward(torch.tensor([1, 2, 3]))
            tree = shape.grow(
                draft.logits_after([1, 2, 3]),
                _ToyExpander(draft, 3),
                Budget(4, 2, 7),
                sampling,
                torch.Generator().manual_seed(1),
            )
            assert 1 < tree.num_nodes <= 7 and int(tree.depths.max()) <= 4, name
            assert not tree.is_chain, name
            assert (tree.draft_probs is not None) == (shape.sampled and not sampling.greedy)


class _ToyExpander:
    """Expands nodes by asking the toy model for the logits after each node's path."""

    def __init__(self, model: ToyBackend, context_length: int) -> None:
        self.model, self.context = model, list(model.cache[:context_length])

    def expand(self, nodes, parents, tokens):
        rows = []
        for node in nodes:
            path, at = [], node
            while at >= 0:
                path.append(tokens[at])
                at = parents[at]
            rows.append(self.model.logits_after(self.context + path[::-1]))
        return torch.stack(rows)


def test_bad_tree_configurations_fail_before_decoding() -> None:
    engine = Engine(ToyBackend(), ToyTokenizer(), draft_model=ToyBackend(seed=3))
    sampling = SamplingParams(max_new_tokens=5, temperature=1.0)
    with pytest.raises(SpecDecodeError, match="takes chains"):
        engine.generate(
            [1], sampling, SpecConfig(drafter="draft-model", tree="iid", verifier="rejection")
        )
    with pytest.raises(SpecDecodeError, match="drafts chains only"):
        engine.generate([1], sampling, SpecConfig(drafter="none", tree="static"))
    with pytest.raises(SpecDecodeError, match="unknown tree shape"):
        engine.generate([1], sampling, SpecConfig(drafter="draft-model", tree="bushy"))
    with pytest.raises(SpecDecodeError, match="at least 1"):
        SpecConfig(tree="static", tree_nodes=0)
    with pytest.raises(SpecDecodeError, match="does not fit in the model's context"):
        engine.generate(
            [1], sampling, SpecConfig(drafter="draft-model", tree="static", tree_nodes=10**6)
        )
    with pytest.raises(SpecDecodeError, match="before its child"):
        DraftTree(torch.tensor([5, 6]), torch.tensor([1, -1]))  # a parent after its child
    with pytest.raises(SpecDecodeError, match="before its child"):
        DraftTree(torch.tensor([5, 6]), torch.tensor([1, 0]))  # a cycle
    with pytest.raises(SpecDecodeError, match="confidence must have shape"):
        DraftTree.chain([5, 6], confidence=torch.tensor([0.5]))


def test_a_chain_is_cut_to_a_prefix_with_its_probabilities_and_forecasts() -> None:
    probs = torch.softmax(torch.randn(4, 6), dim=-1)  # [N, V]
    chain = DraftTree.chain([1, 2, 3, 4], probs, torch.tensor([0.9, 0.8, 0.7, 0.6]))
    cut = chain.prefix(2)
    assert cut.tokens.tolist() == [1, 2] and cut.parents.tolist() == [-1, 0]
    assert torch.equal(cut.draft_probs, probs[:2])
    assert cut.confidence.tolist() == pytest.approx([0.9, 0.8])
    assert chain.prefix(4) is chain and chain.prefix(0).num_nodes == 0
    assert chain.prefix(-1).num_nodes == 0 and DraftTree.empty().prefix(3).num_nodes == 0
    with pytest.raises(SpecDecodeError, match="only a chain"):
        DraftTree(torch.tensor([5, 6]), torch.tensor([-1, -1])).prefix(1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            SpecConfig(drafter="draft-model", tree="static", verifier="spectr"),
            "needs the draft distribution",
        ),
        (
            SpecConfig(drafter="draft-model", tree="without-replacement", verifier="specinfer"),
            "not lossless for sibling drafts drawn without replacement",
        ),
        (
            SpecConfig(drafter="draft-model", tree="iid", verifier="rrs-without-replacement"),
            "not lossless for sibling drafts drawn i.i.d.",
        ),
        (SpecConfig(drafter="draft-model", verifier="greedy"), "exact at temperature 0 only"),
    ],
    ids=["spectr-static", "specinfer-wor", "rrs-iid", "greedy-t1"],
)
def test_verifier_and_draft_mismatches_fail_before_decoding(spec, message) -> None:
    engine = Engine(ToyBackend(), ToyTokenizer(), draft_model=ToyBackend(seed=3))
    sampling = SamplingParams(max_new_tokens=5, temperature=1.0)
    with pytest.raises(SpecDecodeError, match=message):
        engine.generate([1, 2, 3], sampling, spec)
    # The same pairs are fine at temperature 0, where every draft is judged by the argmax.
    greedy = SamplingParams(max_new_tokens=5)
    assert len(engine.generate([1, 2, 3], greedy, spec)[0]) == 5


@pytest.mark.parametrize(
    "verifier", ["specinfer", "spectr", "rrs-without-replacement", "traversal", "lossy-typical"]
)
def test_every_verifier_is_the_greedy_walk_at_temperature_zero(verifier: str) -> None:
    """At temperature 0 the trees carry no draft probabilities (point masses on the first
    child) and the target is one-hot: every verifier must emit the argmax path."""
    gen = torch.Generator().manual_seed(0)
    greedy, other = make_verifier("greedy"), make_verifier(verifier)
    for _ in range(200):
        # root -> [A, B]; A -> [C, E]; B -> [F]: the argmax may be anywhere, or nowhere.
        tree = DraftTree(torch.randint(0, 4, (5,), generator=gen), torch.tensor([-1, -1, 0, 0, 1]))
        logits = torch.randn(6, 4, generator=gen)
        expected = greedy.verify(tree, logits, SamplingParams(), None)
        got = other.verify(tree, logits, SamplingParams(), torch.Generator().manual_seed(1))
        assert got.tokens == expected.tokens


# ---- distributions ---------------------------------------------------------------------------

SAMPLES = 12_000


class _MarkovExpander:
    """Draft logits from an order-1 Markov table: the next token depends on the last one."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def expand(self, nodes, parents, tokens):
        return torch.stack([self.table[tokens[node]] for node in nodes])


def tree_histogram(verifier, shape_name, target_table, draft_table, sampling, budget, seed=0):
    """Counts of each length-LENGTH sequence over SAMPLES draft-tree -> verify generations."""
    rng = torch.Generator().manual_seed(seed)
    shape = make_tree_shape(shape_name)
    counts = torch.zeros(VOCAB**LENGTH, dtype=torch.float64)
    for _ in range(SAMPLES):
        seq = [0]
        while len(seq) <= LENGTH:
            expander = _MarkovExpander(draft_table)
            tree = shape.grow(draft_table[seq[-1]], expander, budget, sampling, rng)
            rows = [seq[-1]] + tree.tokens.tolist()  # the target's logits after root and nodes
            verdict = verifier.verify(tree, target_table[rows], sampling, rng)
            seq.extend(verdict.tokens)
        index = 0
        for token in seq[1 : LENGTH + 1]:
            index = index * VOCAB + token
        counts[index] += 1
    return counts


CASES = {
    # name: (target sharpness, draft sharpness, sampling)
    "plain": (1.0, 1.0, SamplingParams(temperature=1.0)),
    "near-degenerate": (6.0, 0.5, SamplingParams(temperature=1.0)),
    "top-k": (1.5, 1.0, SamplingParams(temperature=0.8, top_k=2)),
    "top-p": (1.5, 1.0, SamplingParams(temperature=1.0, top_p=0.7)),
}
PAIRS = [  # (verifier, tree shape): each lossless verifier with the trees it is meant for
    ("specinfer", "iid"),
    ("specinfer", "static"),
    ("specinfer", "dynamic"),
    ("rrs-without-replacement", "without-replacement"),
    ("rrs-without-replacement", "delayed"),
    ("spectr", "iid"),
    ("traversal", "without-replacement"),
    ("traversal", "delayed"),
]


# The default tier runs every pair on the plain case and each harder case on one pair (these are
# pure-Python loops of 12,000 trees, up to a minute each); the slow tier runs every combination.
DEFAULT_TIER = {("plain", verifier, shape) for verifier, shape in PAIRS} | {
    ("near-degenerate", "rrs-without-replacement", "without-replacement"),
    ("top-k", "specinfer", "iid"),
    ("top-p", "traversal", "without-replacement"),
}


@pytest.mark.parametrize(
    ("case", "verifier", "shape"),
    [
        pytest.param(
            case,
            verifier,
            shape,
            marks=() if (case, verifier, shape) in DEFAULT_TIER else pytest.mark.slow,
            id=f"{case}-{verifier}-{shape}",
        )
        for case in sorted(CASES)
        for verifier, shape in PAIRS
    ],
)
def test_tree_verifiers_keep_the_target_distribution(case: str, verifier: str, shape: str) -> None:
    target_sharpness, draft_sharpness, sampling = CASES[case]
    target_table, draft_table = markov_table(1, target_sharpness), markov_table(2, draft_sharpness)
    counts = tree_histogram(
        make_verifier(verifier), shape, target_table, draft_table, sampling, Budget(2, 3, 5)
    )
    p_value = chi_square_pvalue(counts, exact_joint(target_table, sampling, 0))
    assert p_value > ALPHA, p_value


class _NoResidual(SpecInferVerifier):
    """Broken: after a rejection the next sibling is judged against the untouched target."""

    def verify(self, tree, target_logits, sampling, rng):
        import specdecode.verify.specinfer as module

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(module, "residual", lambda probs, proposal: probs)
            return super().verify(tree, target_logits, sampling, rng)


class _KeepsRejectedInProposal(RecursiveRejectionVerifier):
    """Broken: siblings drawn without replacement judged as if drawn with replacement."""

    def after_rejection(self, proposal, token):
        return proposal


class _UnscaledSpecTr(SpecTrVerifier):
    """Broken: K-SEQ without its scale (rho = 1), so k drafts over-supply the likely tokens."""

    def scale(self, probs, proposal, num_drafts):
        return 1.0


class _TraversalKeepsRejectedInDraft(TraversalVerifier):
    """Broken: after a rejection the parent's draft row keeps the rejected token."""

    def verify(self, tree, target_logits, sampling, rng):
        import specdecode.verify.traversal as module

        original = module._Traversal.reject

        def reject(walk, slot):
            parent = int(walk.tree.parents[slot - 1]) + 1
            kept = walk.draft[parent].clone()
            original(walk, slot)
            walk.draft[parent] = kept
            walk.refresh_below(parent)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(module._Traversal, "reject", reject)
            return super().verify(tree, target_logits, sampling, rng)


@pytest.mark.parametrize(
    ("broken", "shape"),
    [
        (_NoResidual(), "iid"),
        (_KeepsRejectedInProposal(), "without-replacement"),
        (SpecInferVerifier(), "without-replacement"),
        (_UnscaledSpecTr(), "iid"),
        pytest.param(SpecTrVerifier(), "without-replacement", marks=pytest.mark.slow),
        (_TraversalKeepsRejectedInDraft(), "without-replacement"),
        pytest.param(TraversalVerifier(), "iid", marks=pytest.mark.slow),
    ],
    ids=[
        "no-residual",
        "rrs-keeps-rejected",
        "specinfer-on-draws-without-replacement",
        "spectr-unscaled",
        "spectr-on-draws-without-replacement",
        "traversal-keeps-rejected",
        "traversal-on-iid-draws",
    ],
)
def test_broken_tree_verifiers_are_caught(broken, shape: str) -> None:
    target_sharpness, draft_sharpness, sampling = CASES["plain"]
    target_table, draft_table = markov_table(1, target_sharpness), markov_table(2, draft_sharpness)
    counts = tree_histogram(broken, shape, target_table, draft_table, sampling, Budget(2, 3, 5))
    assert chi_square_pvalue(counts, exact_joint(target_table, sampling, 0), True) < BROKEN


class _SpecInferTargetNotTruncated(SpecInferVerifier):
    """Broken: the target gets the temperature but not top-k / top-p (the drafts do)."""

    def verify(self, tree, target_logits, sampling, rng):
        return super().verify(tree, target_logits, replace(sampling, top_k=0, top_p=1.0), rng)


@pytest.mark.parametrize("case", ["top-k", pytest.param("top-p", marks=pytest.mark.slow)])
def test_a_tree_verifier_that_ignores_top_k_or_top_p_is_caught(case: str) -> None:
    target_sharpness, draft_sharpness, sampling = CASES[case]
    target_table, draft_table = markov_table(1, target_sharpness), markov_table(2, draft_sharpness)
    broken = _SpecInferTargetNotTruncated()
    counts = tree_histogram(broken, "iid", target_table, draft_table, sampling, Budget(2, 3, 5))
    assert chi_square_pvalue(counts, exact_joint(target_table, sampling, 0), True) < BROKEN


def test_residual_is_normalised() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2])
    proposal = torch.tensor([0.2, 0.6, 0.2])
    assert torch.allclose(residual(probs, proposal), torch.tensor([1.0, 0.0, 0.0]))


def test_the_headroom_script_replays_chains_and_bounds_every_greedy_tree() -> None:
    """benchmarks/tree_headroom.py, from the draft's rank of each emitted token: its chain is the
    engine's fixed chain forward for forward, and no tree the engine builds beats its bound."""
    headroom = load_benchmark_script("tree_headroom")
    prompt, count, nodes = [0, 1, 2], 60, 6
    output = plain_greedy(ToyBackend(seed=1, vocab_size=6), prompt, count)
    draft = ToyBackend(seed=1, order=2, vocab_size=6)
    ranks = []
    for t in range(count):
        logits = draft.logits_after(prompt + output[:t])
        ranks.append(1 + int((logits > logits[output[t]]).sum()))
    assert 1 in ranks and max(ranks) > 1  # the draft agrees and disagrees: both paths tested

    def engine_forwards(tree: str) -> int:
        engine = Engine(
            ToyBackend(seed=1, vocab_size=6),
            ToyTokenizer(),
            draft_model=ToyBackend(seed=1, order=2, vocab_size=6),
        )
        spec = SpecConfig(
            drafter="draft-model",
            controller="fixed",
            num_draft_tokens=nodes,
            tree=tree,
            tree_width=2,
            tree_nodes=nodes,
        )
        ids, _, stats = engine.generate(prompt, SamplingParams(max_new_tokens=count), spec)
        assert ids == output
        return stats.target_forwards

    def simulated(accepts) -> int:
        return headroom.tokens_per_forward(ranks, accepts)[1]

    chain = simulated(lambda r, s: headroom.chain_accepts(r, s, nodes))
    assert engine_forwards("chain") == chain
    bound = simulated(lambda r, s: headroom.best_tree_accepts(r, s, nodes, 2))
    assert bound < chain  # the bound sees the branches a chain misses
    for tree in ("static", "dynamic", "delayed"):
        assert engine_forwards(tree) >= bound, tree


def test_the_headroom_bound_spends_a_node_per_better_ranked_sibling() -> None:
    headroom = load_benchmark_script("tree_headroom")
    ranks = [1, 2, 1, 3, 1, 1]
    assert headroom.chain_accepts(ranks, 0, 8) == 1
    assert headroom.best_tree_accepts(ranks, 0, 4) == 3  # 1 + 2 + 1 nodes
    assert headroom.best_tree_accepts(ranks, 0, 7) == 4  # 1 + 2 + 1 + 3
    assert headroom.best_tree_accepts(ranks, 0, 7, width=2) == 3  # rank 3 is no child of 2
    assert headroom.best_tree_accepts(ranks, 0, 100) == 5  # the last token is the bonus
    assert headroom.tokens_per_forward(ranks, lambda r, s: headroom.chain_accepts(r, s, 8)) == (
        6,
        3,  # from 0, 2 and 4: one rank-1 draft accepted, then the target's token
    )


def test_the_replay_target_counts_the_forwards_the_real_target_would() -> None:
    """benchmarks/replay_trees.py's stand-in target, which knows only the greedy output, gives
    every chain and tree the same steps as the target that produced it."""
    replay = load_benchmark_script("replay_trees")
    prompt, count = [0, 1, 2], 50
    output = plain_greedy(ToyBackend(seed=1, vocab_size=6), prompt, count)
    for tree in ("chain", "static", "dynamic", "delayed"):
        spec = SpecConfig(  # a controller whose lengths do not depend on measured times
            drafter="draft-model",
            controller="heuristic",
            num_draft_tokens=5,
            tree=tree,
            tree_width=2,
            tree_nodes=6,
        )
        sampling = SamplingParams(max_new_tokens=count)
        forwards = []
        for target in (
            ToyBackend(seed=1, vocab_size=6),
            replay.ReplayTarget(6, prompt, output, max_context=512),
        ):
            engine = Engine(
                target, ToyTokenizer(), draft_model=ToyBackend(seed=1, order=2, vocab_size=6)
            )
            ids, _, stats = engine.generate(prompt, sampling, spec)
            assert ids == output, tree
            forwards.append(stats.target_forwards)
        assert forwards[0] == forwards[1] < count, tree


def test_the_calibration_table_counts_each_candidate_where_its_probability_falls() -> None:
    headroom = load_benchmark_script("tree_headroom")
    view = headroom.DraftView(
        ranks=[1, 2, 1, 5],
        top_probs=[[0.95, 0.03, 0.01], [0.6, 0.3, 0.05], [0.92, 0.05, 0.01], [0.5, 0.2, 0.1]],
    )
    rows = headroom.calibration_table([view], [0, 0.5, 0.9, 1])
    assert rows[2] == "| 0 to 0.5 | - | 0.250 vs 0.145 (n=4) | 0.000 vs 0.043 (n=4) |"
    assert rows[3] == "| 0.5 to 0.9 | 0.000 vs 0.550 (n=2) | - | - |"
    assert rows[4] == "| 0.9 to 1 | 1.000 vs 0.935 (n=2) | - | - |"
