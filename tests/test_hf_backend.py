"""The hf backend: chains through transformers' public API give transformers' own logits."""

from __future__ import annotations

import logging

import pytest
import torch

from specdecode import SamplingParams, SpecConfig, SpecDecoder
from specdecode.backends.hf import HFBackend
from specdecode.errors import SpecDecodeError
from specdecode.models import load_tokenizer, resolve_gguf
from specdecode.tree import DraftTree

logging.getLogger("transformers").setLevel(logging.ERROR)
NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def backend() -> HFBackend:
    path = resolve_gguf(NAME)
    return HFBackend.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def test_chain_forward_and_commit_match_a_plain_forward(backend: HFBackend) -> None:
    ids = torch.randint(10, 40_000, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        full = backend.model(torch.tensor([ids])).logits[0].float()  # [30, V]
    backend.prefill(ids[:20])
    chain = DraftTree.chain(ids[20:25])
    logits = backend.forward_tree(chain)  # rows for positions 19..24
    assert torch.allclose(logits, full[19:25], atol=1e-3, rtol=0)
    backend.commit([0, 1], next_token=ids[22])  # keep 20, 21; 22 is the new root
    after = backend.forward_tree(DraftTree.chain(ids[23:26]))
    assert torch.allclose(after, full[22:26], atol=1e-3, rtol=0)


def test_trees_are_refused(backend: HFBackend) -> None:
    backend.prefill([1, 2, 3])
    tree = DraftTree(torch.tensor([5, 6]), torch.tensor([-1, -1]))
    with pytest.raises(SpecDecodeError, match="chains"):
        backend.forward_tree(tree)


def test_greedy_prompt_lookup_is_exact_on_the_hf_backend(backend: HFBackend) -> None:
    llm = SpecDecoder(backend, load_tokenizer(NAME))
    prompt = "Repeat this list exactly: apple, banana, cherry, apple, banana, cherry."
    plain = llm.generate(prompt, SamplingParams(max_new_tokens=32), SpecConfig(drafter="none"))
    fast = llm.generate(
        prompt, SamplingParams(max_new_tokens=32), SpecConfig(controller="heuristic")
    )
    assert fast.token_ids == plain.token_ids
    assert fast.stats.target_forwards < plain.stats.target_forwards  # drafts were accepted


def test_a_cache_that_kept_a_wrong_token_is_seen(backend: HFBackend) -> None:
    """Negative control of the first test: had the commit kept a node that is not the text's
    (here the draft's second token is wrong and kept anyway), the next logits leave the plain
    forward's, so that comparison can fail."""
    ids = torch.randint(10, 40_000, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        full = backend.model(torch.tensor([ids])).logits[0].float()  # [30, V]
    backend.prefill(ids[:20])
    wrong = [ids[20], (ids[21] + 1) % 40_000, ids[22]]
    backend.forward_tree(DraftTree.chain(wrong))
    backend.commit([0, 1], next_token=ids[22])  # keeps the wrong second token
    after = backend.forward_tree(DraftTree.chain(ids[23:26]))
    assert not torch.allclose(after, full[22:26], atol=1e-3, rtol=0)
