"""How close does each verifier come to the best acceptance any lossless verifier can reach?

At a node with `n` drafted children drawn from the draft distribution `q`, with target
distribution `p` there, a lossless verifier must emit a token distributed as `p`; the chance that
it is one of the drafts is at most the optimal-transport value (Hu et al., "Towards Optimal
Multi-draft Speculative Decoding", 2025, its dual):

    alpha* = 1 + min over token sets H of [ p(H) - P(every draft lies in H) ]

(any coupling puts at most `p(H)` on drafts inside `H` and at most `P(some draft outside H)` on
the others). With i.i.d. drafts `P(every draft in H) = q(H)^n` and the minimum is reached on a
prefix of the tokens sorted by `p/q`, lowest first (Hu et al.), so it costs a sort. Drafts without
replacement use the same prefixes (exact in every brute-force check in the tests for `n <= 2`,
where the probability has a closed form). For `n > 2` drafts without replacement the bound is an
upper bound of alpha* (still one that no lossless verifier can exceed): the first two draws are
exact, and each later one lands in `H` with probability at least `(q(H) - M) / (1 - M)`, `M` the
mass of the largest earlier draws `H` could have given. Deterministic drafts (a fixed token set
`S`) give `alpha* = p(S)`.

`analyze` generates with each method, and at every step compares the event "the first emitted
token is one of the root's drafts" with `alpha*` at the root. The root is where the bound holds for
every verifier: whatever a verifier does deeper, its first token must have the law `p_root`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from specdecode.config import SamplingParams, SpecConfig
from specdecode.engine import Engine, sibling_draws
from specdecode.errors import SpecDecodeError
from specdecode.sampling import shaped_probs
from specdecode.tree import DraftTree, SiblingDraws
from specdecode.trees import CHAIN, make_tree_shape
from specdecode.verify import Verdict, make_verifier
from specdecode.verify.specinfer import draft_row


def optimal_acceptance(
    target_probs: torch.Tensor,  # [V]
    draft_probs: torch.Tensor,  # [V]
    num_drafts: int,
    draws: SiblingDraws,
    draft_tokens: Sequence[int] = (),
) -> float:
    """alpha*: the best probability, over lossless verifiers, that the emitted token is a draft
    (an upper bound of it where `bound_is_exact` says so)."""
    if draws is SiblingDraws.DETERMINISTIC:
        return float(target_probs[list(set(draft_tokens))].sum())
    # In float64 and summing to 1 as the samplers make them: a float32 row is off by ~1e-7, which
    # the formulas' `1 - q(x)` would read as real leftover mass next to a confident draft.
    p = target_probs.double() / target_probs.double().sum()
    q = draft_probs.double() / draft_probs.double().sum()
    ratio = torch.where(q > 0, p / q.clamp_min(1e-300), torch.full_like(p, math.inf))
    order = torch.argsort(ratio)
    p_sorted, q_sorted = p[order], q[order]
    zero = torch.zeros(1, dtype=torch.float64)
    p_prefix = torch.cat([zero, torch.cumsum(p_sorted, 0)])  # [V+1], p(H) of each prefix
    q_prefix = torch.cat([zero, torch.cumsum(q_sorted, 0)]).clamp_(max=1.0)
    if draws is SiblingDraws.INDEPENDENT or num_drafts == 1:
        all_inside = q_prefix**num_drafts
    else:  # two distinct draws: sum over x in H of q(x) (q(H) - q(x)) / (1 - q(x))
        spare = (1.0 - q_sorted).clamp_min(1e-300)
        first = torch.cat([zero, torch.cumsum(q_sorted / spare, 0)])
        second = torch.cat([zero, torch.cumsum(q_sorted**2 / spare, 0)])
        all_inside = (q_prefix * first - second).clamp_(min=0.0)
        if num_drafts > 2:
            all_inside = all_inside * _later_draws_inside(q_sorted, q_prefix, num_drafts)
    return float(min(1.0, 1.0 + float((p_prefix - all_inside).min())))


def bound_is_exact(num_drafts: int, draws: SiblingDraws) -> bool:
    """Whether `optimal_acceptance` is alpha* itself rather than an upper bound of it."""
    return draws is not SiblingDraws.WITHOUT_REPLACEMENT or num_drafts <= 2


def _later_draws_inside(
    q_sorted: torch.Tensor,  # [V], draft probabilities in the order of the prefixes
    q_prefix: torch.Tensor,  # [V+1], q(H) of each prefix
    num_drafts: int,
) -> torch.Tensor:  # [V+1]
    """A lower bound, per prefix H, of P(draws 3..n land in H | draws 1 and 2 did).

    After i draws inside H the next lands in H with probability (q(H) - m) / (1 - m), m the mass
    already drawn, which falls as m grows; m is at most M_i, the sum of the i largest q in H."""
    kept = num_drafts - 1
    largest: list[float] = []  # the `kept` largest q of the prefix so far, ascending
    changed_at, sums_then = [0], [[0.0] * kept]  # where the top sums change, and to what
    for index, value in enumerate(q_sorted.tolist(), start=1):
        if len(largest) < kept or value > largest[0]:
            largest = sorted([*largest, value])[-kept:]
            changed_at.append(index)
            sums_then.append([sum(largest[-(i + 1) :]) for i in range(kept)])
    # Each prefix takes the sums of the last change at or before its end.
    last_change = torch.zeros(q_prefix.shape[0], dtype=torch.long)
    last_change[changed_at] = torch.arange(len(changed_at))
    last_change = torch.cummax(last_change, 0).values
    top_sums = torch.tensor(sums_then, dtype=q_prefix.dtype)[last_change]  # [V+1, kept]
    factor = torch.ones_like(q_prefix)
    for i in range(2, num_drafts):
        drawn = top_sums[:, i - 1]  # M_i per prefix
        room = (1.0 - drawn).clamp_min(1e-300)
        factor *= ((q_prefix - drawn) / room).clamp_(0.0, 1.0)
    return factor


@dataclass
class RootRecord:
    """Per method: how often the root's drafts were accepted, and what the bound allowed."""

    steps: int = 0  # steps whose root had drafts
    exact_bound: bool = True  # False once a step's bound was an upper bound of alpha*
    accepted: int = 0
    bound_sum: float = 0.0
    bound_variance_sum: float = 0.0  # sum of b (1 - b): the count's variance if rates were b
    emitted: int = 0
    forwards: int = 0
    drafts_per_root: list[int] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0

    @property
    def bound(self) -> float:
        return self.bound_sum / self.steps if self.steps else 0.0

    @property
    def standard_error(self) -> float:
        """Of the acceptance rate, were each step accepted with exactly its bound's probability
        (an observed rate of 0 or 1 would otherwise claim no uncertainty at all)."""
        return math.sqrt(self.bound_variance_sum) / self.steps if self.steps else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.emitted / self.forwards if self.forwards else 0.0

    @property
    def exceeds_bound(self) -> bool:
        """Measured acceptance above the bound by more than 4 standard errors: a lossy verifier
        (or a bug); the last term is a continuity correction for few steps."""
        return self.acceptance > self.bound + 4 * self.standard_error + 1 / max(self.steps, 1)


def analyze_method(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams,
    spec: SpecConfig,
    on_prompt: Callable[[], None] | None = None,
) -> RootRecord:
    """Generate every prompt with `spec` and record root acceptance against alpha*."""
    from specdecode.drafters import DRAFTERS

    if sampling.greedy:
        raise SpecDecodeError("analyze compares sampling verifiers: give --temperature above 0")
    drafter = DRAFTERS.get(spec.drafter)
    if drafter is None:
        raise SpecDecodeError(f"unknown drafter {spec.drafter!r}")
    shape = None if spec.tree == CHAIN else make_tree_shape(spec.tree, spec.tree_options)
    draws = sibling_draws(shape, drafter.samples_drafts)
    record = RootRecord()

    def observe(tree: DraftTree, target_logits: torch.Tensor, verdict: Verdict) -> None:
        children = tree.children[0]
        if not children:
            return
        target_probs = shaped_probs(target_logits[0], sampling)  # [V]
        draft_probs = draft_row(tree, children[0], target_probs.shape[-1])  # [V]
        tokens = [int(tree.tokens[c]) for c in children]
        bound = optimal_acceptance(target_probs, draft_probs, len(children), draws, tokens)
        record.exact_bound &= bound_is_exact(len(children), draws)
        record.steps += 1
        record.bound_sum += bound
        record.bound_variance_sum += bound * (1.0 - bound)
        # The coupling event the bound is about: the first token is one of the drafts (a
        # recovered token may coincide with a rejected draft and still counts).
        record.accepted += int(verdict.tokens[0] in tokens)
        record.drafts_per_root.append(len(children))

    for index, prompt in enumerate(prompts):
        seeded = (
            sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + index)
        )
        _, _, stats = engine.generate(prompt, seeded, spec, observe)
        record.emitted += stats.emitted_tokens
        record.forwards += stats.target_forwards
        if on_prompt is not None:
            on_prompt()
    return record


#: What `specdecode analyze` compares by default: each sampling verifier with the drafts it is
#: lossless for, as "tree/verifier".
DEFAULT_METHODS = (
    "chain/rejection",
    "chain/traversal",
    "iid/specinfer",
    "iid/spectr",
    "without-replacement/rrs-without-replacement",
    "without-replacement/traversal",
)


def parse_method(text: str, drafter: str, nodes: int, width: int) -> SpecConfig:
    """ "tree/verifier" (or just "tree") -> a fixed-budget SpecConfig with `nodes` draft nodes."""
    tree, _, verifier = text.partition("/")
    # Unknown names fail here, before any model is loaded or any method has run.
    if tree != CHAIN:
        make_tree_shape(tree)
    if verifier:
        make_verifier(verifier)
    depth = nodes if tree == CHAIN else max(1, nodes // width)
    return SpecConfig(
        drafter=drafter,
        verifier=verifier or None,
        controller="fixed",
        num_draft_tokens=depth,
        max_draft_tokens=depth,
        tree=tree,
        tree_width=width,
        tree_nodes=None if tree == CHAIN else nodes,
    )


def report_table(rows: Sequence[tuple[str, RootRecord]]) -> str:
    lines = [
        "| method | root steps | drafts at root | root acceptance | optimal bound | gap | "
        "tokens / forward |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, record in rows:
        if not record.steps:
            lines.append(f"| {label} | 0 | - | - | - | - | {record.tokens_per_forward:.2f} |")
            continue
        drafts = sum(record.drafts_per_root) / max(len(record.drafts_per_root), 1)
        flag = " (above the bound: lossy?)" if record.exceeds_bound else ""
        # Over two drafts without replacement the bound is an upper bound of the optimum.
        at_most = "" if record.exact_bound else "≤ "
        lines.append(
            f"| {label} | {record.steps} | {drafts:.1f} | {record.acceptance:.3f} "
            f"± {record.standard_error:.3f}{flag} | {at_most}{record.bound:.3f} | "
            f"{at_most}{record.bound - record.acceptance:+.3f} | "
            f"{record.tokens_per_forward:.2f} |"
        )
    return "\n".join(lines)
