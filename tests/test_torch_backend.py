"""The torch backend: logits equal transformers', tree attention equals per-path decoding, and a
token's logits do not depend on how many tokens share its forward (what greedy exactness needs)."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from tiny_models import to_hf_names

from specdecode.backends.torch import TorchBackend
from specdecode.models import load_checkpoint, resolve_gguf
from specdecode.models.config import TransformerConfig
from specdecode.tree import DraftTree

logging.getLogger("transformers").setLevel(logging.ERROR)

FAMILIES = ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct", "gemma-3-270m"]


@functools.cache  # loaded once per module: the tests only read it (gemma's takes a while)
def hf_reference(name: str):
    from transformers import AutoModelForCausalLM

    path = resolve_gguf(name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.mark.parametrize(
    "name",
    # Gemma's reference forward in transformers takes over a minute here: slow tier.
    [
        name if name != "gemma-3-270m" else pytest.param(name, marks=pytest.mark.slow)
        for name in FAMILIES
    ],
)
def test_logits_match_transformers(name: str) -> None:
    """Prefill, then three one-token steps; float32 against transformers' float32 forward.

    Tolerance: float32, 2e-3 absolute on logits of magnitude ~10-40 (the kernels differ, the
    weights are the same dequantized values); bfloat16, argmax agreement on at least 90% of
    positions and a mean absolute difference under 0.25 (bf16 keeps ~3 significant digits, and
    the error grows through 18-30 layers: single logits can be off by 2-3).
    """
    from specdecode.models import load_tokenizer

    text = (
        "def quicksort(items):\n    if len(items) <= 1:\n        return items\n    pivot = items[0]"
    )
    ids = torch.tensor([load_tokenizer(name).encode(text)[:24]])
    with torch.inference_mode():
        reference = hf_reference(name)(ids).logits[0]  # [T, V]
    for dtype, atol in ((torch.float32, 2e-3), (torch.bfloat16, None)):
        backend = TorchBackend.from_checkpoint(
            load_checkpoint(name, dtype), dtype=dtype, max_context=256
        )
        count = ids.shape[1]
        first = backend.forward(ids[0, : count - 3])
        steps = [backend.forward(ids[0, i : i + 1]) for i in range(count - 3, count)]
        ours = torch.cat([first, *steps])
        vocab = min(ours.shape[-1], reference.shape[-1])
        ours, ref = ours[:, :vocab], reference[:, :vocab]
        if atol is not None:
            assert torch.allclose(ours, ref, atol=atol, rtol=0), float((ours - ref).abs().max())
        else:
            agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean()
            assert agree >= 0.9 and float((ours - ref).abs().mean()) < 0.25


@pytest.mark.slow
def test_gemma_sliding_window_beyond_the_window() -> None:
    """Gemma 3 270M's local layers see 512 tokens: check a 600-token sequence against HF."""
    name = "gemma-3-270m"
    ids = torch.randint(10, 5000, (1, 600), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = hf_reference(name)(ids).logits[0, -8:]
    backend = TorchBackend.from_checkpoint(
        load_checkpoint(name, torch.float32), dtype=torch.float32, max_context=1024
    )
    backend.forward(ids[0, :592], return_logits=False)
    ours = backend.forward(ids[0, 592:])
    assert torch.allclose(ours, reference, atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def small_bf16() -> TorchBackend:
    return TorchBackend.from_checkpoint(
        load_checkpoint(FAMILIES[0], torch.bfloat16), max_context=1024
    )


@pytest.mark.parametrize("products", ["dot-product", "tiles"])
def test_logits_do_not_depend_on_forward_size(
    small_bf16: TorchBackend, products: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bfloat16: one token at a time and chunks of 2..16 give bitwise-identical logits, with
    either kernel for the products (the AMX tiles where the CPU has them)."""
    from specdecode.backends.torch import kernels

    if products == "tiles" and kernels.rowwise_linear_tiles() is None:
        pytest.skip("needs a CPU with AMX tile instructions (Intel Sapphire Rapids or later)")
    monkeypatch.setitem(kernels._state, "tiles_chosen", products == "tiles")
    backend = small_bf16
    ids = torch.randint(10, 100_000, (160,), generator=torch.Generator().manual_seed(2))
    backend.reset()
    backend.forward(ids[:40], return_logits=False)
    single = torch.cat([backend.forward(ids[i : i + 1]) for i in range(40, 160)])
    for chunk in (2, 3, 7, 16):
        backend.truncate(40)
        chunks = torch.cat([backend.forward(ids[i : i + chunk]) for i in range(40, 160, chunk)])
        assert torch.equal(chunks[:120], single), f"chunk {chunk}"


def test_products_whose_order_follows_the_row_count_give_other_bits(
    small_bf16: TorchBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control of the test above: with products that block their reduction by the row
    count, as CPU libraries do on many machines (oneDNN on an Intel Xeon without AVX-512 BF16;
    on a Zen 4 with it every count from 2 up happens to agree), a token's logits change with the
    rows beside it, so that test can fail."""
    import torch.nn.functional as F

    from specdecode.backends.torch.invariance import BatchInvariantLinear

    def blocked_by_row_count(layer: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs.reshape(-1, inputs.shape[-1]).shape[0]
        block = 64 if rows <= 2 else 256
        width = inputs.shape[-1]
        # Each block's partial sum is rounded to bfloat16 before the next is added.
        out = F.linear(inputs[..., :block], layer.weight[:, :block], layer.bias)
        for start in range(block, width, block):
            out = out + F.linear(
                inputs[..., start : start + block], layer.weight[:, start : start + block]
            )
        return out

    monkeypatch.setattr(BatchInvariantLinear, "forward", blocked_by_row_count)
    backend = small_bf16
    ids = torch.randint(10, 100_000, (72,), generator=torch.Generator().manual_seed(2))
    backend.reset()
    backend.forward(ids[:40], return_logits=False)
    single = torch.cat([backend.forward(ids[i : i + 1]) for i in range(40, 72)])
    backend.truncate(40)
    chunks = torch.cat([backend.forward(ids[i : i + 16]) for i in range(40, 72, 16)])
    assert not torch.equal(chunks, single)


def test_prefill_sized_forwards_agree_with_small_ones(small_bf16: TorchBackend) -> None:
    """Forwards over more than 128 tokens take another path (library products, float32 on CPUs
    without bfloat16 arithmetic); on real text their logits agree with those of small forwards
    to bfloat16 precision (measured: 95% argmax agreement, mean difference 0.04, and each path
    as close to the float32 model)."""
    import inspect
    import json.encoder

    from specdecode.models import load_tokenizer

    text = inspect.getsource(json.encoder)
    ids = torch.tensor(load_tokenizer(FAMILIES[0]).encode(text)[:240])
    backend = small_bf16
    backend.reset()
    large = backend.forward(ids)  # [240, V]
    backend.truncate(0)
    small = torch.cat([backend.forward(ids[i : i + 60]) for i in range(0, 240, 60)])
    agree = float((large.argmax(-1) == small.argmax(-1)).float().mean())
    difference = float((large - small).abs().mean())
    assert agree >= 0.9 and difference < 0.1, (agree, difference)


# Prompt lengths: gemma's cross its 512-token sliding window; smollm's at 130 showed that library
# attention gives a node other bits than decoding its path alone.
TREE_CASES = [(FAMILIES[0], 300), (FAMILIES[1], 130), (FAMILIES[2], 600)]


@pytest.mark.parametrize("attention", ["kernel", "row-by-row"])
@pytest.mark.parametrize(("name", "prompt_length"), TREE_CASES, ids=[c[0] for c in TREE_CASES])
def test_tree_forward_gives_each_node_the_bits_of_decoding_its_path(
    name: str, prompt_length: int, attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logits at every node of one tree forward equal, bit for bit, those of feeding the node's
    path one token at a time, as plain decoding does: what greedy tree decoding's exactness
    rests on."""
    from specdecode.backends.torch import kernels

    if attention == "row-by-row":
        monkeypatch.setattr(kernels, "rowwise_attention", lambda: None)
    elif kernels.rowwise_attention() is None:
        pytest.skip("the attention kernel needs AVX-512 (the row-by-row case covers this CPU)")
    backend = TorchBackend.from_checkpoint(
        load_checkpoint(name, torch.bfloat16), max_context=prompt_length + 32
    )
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(10, 30_000, (prompt_length,), generator=generator)
    #  root -> 0 -> 2 -> 4 ; 0 -> 5 -> 9 ; root -> 1 -> 3 -> 7 -> 8 ; root -> 6
    parents = torch.tensor([-1, -1, 0, 1, 2, 0, -1, 3, 7, 5])
    tree = DraftTree(torch.randint(10, 30_000, (10,), generator=generator), parents)
    backend.prefill(prompt.tolist())
    tree_logits = backend.forward_tree(tree)  # [11, V]
    for node in range(tree.num_nodes):
        backend.truncate(prompt_length - 1)
        path = [int(prompt[-1])] + [int(tree.tokens[n]) for n in tree.path_to(node)]
        for token in path:
            decoded = backend.forward(torch.tensor([token]))  # [1, V]
        assert torch.equal(tree_logits[node + 1], decoded[0]), (node, tree.path_to(node))


def _three_sequences(
    backend: TorchBackend, lengths: tuple[int, int, int]
) -> tuple[list[TorchBackend], list[list[int]], list[DraftTree]]:
    """Forks of `backend` prefilled with prompts of these lengths (returned), and a tree, a
    chain and an empty tree (the root alone) to verify on them."""
    generator = torch.Generator().manual_seed(5)
    sequences = [backend, backend.fork(), backend.fork()]
    prompts = [torch.randint(10, 30_000, (n,), generator=generator).tolist() for n in lengths]
    for sequence, prompt in zip(sequences, prompts, strict=True):
        sequence.prefill(prompt)
    parents = torch.tensor([-1, -1, 0, 1, 2, 0, -1])
    trees = [
        DraftTree(torch.randint(10, 30_000, (7,), generator=generator), parents),
        DraftTree.chain(torch.randint(10, 30_000, (5,), generator=generator).tolist()),
        DraftTree.empty(),
    ]
    return sequences, prompts, trees


# (model, attention, rows per forward); gemma's first prompt crosses its 512-token sliding window,
# and 8 rows per forward split the three trees (8, 6 and 1 rows) over two forwards.
BATCH_CASES = [
    (FAMILIES[0], "kernel", None),
    (FAMILIES[0], "row-by-row", None),
    (FAMILIES[0], "kernel", 8),
    (FAMILIES[2], "kernel", None),
]


@pytest.mark.parametrize(("name", "attention", "max_rows"), BATCH_CASES)
def test_sequences_verified_in_one_forward_get_the_bits_of_each_alone(
    name: str, attention: str, max_rows: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Continuous batching's exactness: three sequences' trees verified together (a fork per
    sequence, each with its own cache) give every row the logits of that tree verified on its
    own, bit for bit, and commit and go on as alone."""
    from specdecode.backends.torch import backend as torch_backend
    from specdecode.backends.torch import kernels

    if attention == "row-by-row":
        monkeypatch.setattr(kernels, "rowwise_attention", lambda: None)
    elif kernels.rowwise_attention() is None:
        pytest.skip("the attention kernel needs AVX-512 (the row-by-row case covers this CPU)")
    if max_rows is not None:
        monkeypatch.setattr(torch_backend, "MAX_INVARIANT_ROWS", max_rows)
    lengths = (600, 47, 6) if "gemma" in name else (130, 47, 6)
    backend = TorchBackend.from_checkpoint(
        load_checkpoint(name, torch.bfloat16), max_context=lengths[0] + 32
    )
    sequences, prompts, trees = _three_sequences(backend, lengths)
    together = backend.forward_trees(sequences, trees)
    for sequence, tree, logits in zip(sequences, trees, together, strict=True):
        assert logits.shape == (tree.num_nodes + 1, backend.vocab_size)
        sequence.commit([], 11)  # keep the root, then a step of the root alone on each
    again = backend.forward_trees(sequences, [DraftTree.empty()] * 3)
    for sequence, prompt, tree, logits, next_logits in zip(
        sequences, prompts, trees, together, again, strict=True
    ):
        sequence.prefill(prompt)  # the same prompt: back to where the batch started
        assert torch.equal(sequence.forward_tree(tree), logits)
        sequence.commit([], 11)
        assert torch.equal(sequence.forward_tree(DraftTree.empty()), next_logits)


def test_a_forked_draft_model_scores_its_own_part_of_the_vocabulary() -> None:
    """A draft model that scores part of the vocabulary gives each fork its own scored set:
    what one sequence was fed is not scored for another, and a new prompt on one fork does not
    make another forget its own."""
    from tiny_models import tiny_torch_backend

    target = tiny_torch_backend(vocab_size=64)
    draft = TorchBackend(target.config, to_hf_names(target.model, target.config), quantize="int8")
    draft.limit_draft_vocabulary([0, 1])
    twin = draft.fork()
    draft.prefill([5, 6, 7])
    twin.prefill([9, 10, 11])
    mine = draft.forward(torch.tensor([7]))[0]
    theirs = twin.forward(torch.tensor([11]))[0]
    assert torch.isfinite(mine[[0, 1, 5, 6, 7]]).all() and torch.isinf(mine[[9, 10, 11]]).all()
    assert torch.isfinite(theirs[[0, 1, 9, 10, 11]]).all() and torch.isinf(theirs[[5, 6]]).all()
    twin.prefill([12, 13])  # a new request on the twin
    assert torch.isfinite(draft.forward(torch.tensor([7]))[0][[5, 6]]).all()


def test_attention_kernel_depends_only_on_the_keys_a_row_sees() -> None:
    """The kernel against float64 softmax attention, and a row's output unchanged when masked
    keys are interleaved with its visible ones (as in a tree)."""
    from specdecode.backends.torch import kernels

    attend = kernels.rowwise_attention()
    if attend is None:
        pytest.skip("the attention kernel needs AVX-512 and a C++ compiler")
    torch.manual_seed(0)
    kv_heads, group, rows, slots, d = 2, 3, 5, 70, 40  # d not a multiple of 16: ragged lanes
    q = torch.randn(kv_heads, group * rows, d)
    keys, values = torch.randn(2, kv_heads, slots, d).to(torch.bfloat16)
    allowed = torch.rand(rows, slots) < 0.6
    allowed[:, 0] = True
    out = attend(q, keys, values, allowed, 0.3)  # [Hkv, G*R, D]
    scores = torch.einsum("hqd,hld->hql", q.double(), keys.double()) * 0.3
    row_of_query = torch.arange(group * rows) % rows
    scores = scores.masked_fill(~allowed[row_of_query], float("-inf"))
    reference = torch.softmax(scores, dim=-1) @ values.double()
    assert torch.allclose(out.double(), reference, atol=1e-5, rtol=1e-5)
    # Row 0's visible keys, packed densely, then spread out among masked keys.
    seen = allowed[0].nonzero().squeeze(1)
    dense = attend(
        q.view(kv_heads, group, rows, d)[:, :, :1].contiguous().view(kv_heads, group, d),
        keys[:, seen].contiguous(),
        values[:, seen].contiguous(),
        torch.ones(1, seen.shape[0], dtype=torch.bool),
        0.3,
    )
    assert torch.equal(dense, out.view(kv_heads, group, rows, d)[:, :, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_kernel_fast_paths_give_the_general_paths_bits(dtype: torch.dtype) -> None:
    """Heads of 64, 128 and 256 values take paths that keep the query in registers and run
    sums side by side; zero-padding a head to a size without them (the general path) must give
    the same bits, so that the fast paths change no greedy output."""
    from specdecode.backends.torch import kernels

    attend = kernels.rowwise_attention()
    if attend is None:
        pytest.skip("the attention kernel needs AVX-512 and a C++ compiler")
    torch.manual_seed(1)
    kv_heads, group, rows, slots = 2, 3, 5, 70  # 70 keys: groups of four and a rest
    allowed = torch.rand(rows, slots) < 0.6
    allowed[:, 0] = True
    for d in (64, 128, 256):
        q = torch.randn(kv_heads, group * rows, d)
        keys, values = torch.randn(2, kv_heads, slots, d).to(dtype)

        def padded(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, 8))  # d + 8: the general path

        fast = attend(q, keys, values, allowed, 0.3)
        general = attend(padded(q), padded(keys), padded(values), allowed, 0.3)[..., :d]
        assert torch.equal(fast, general), d


def test_commit_keeps_only_the_accepted_path(small_bf16: TorchBackend) -> None:
    backend = small_bf16
    prompt = torch.randint(10, 100_000, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    tree = DraftTree(torch.tensor([11, 22, 33, 44]), torch.tensor([-1, -1, 1, 2]))
    backend.prefill(prompt)
    backend.forward_tree(tree)
    backend.commit([1, 2, 3], next_token=55)  # the branch 22 -> 33 -> 44
    after_commit = backend.forward(torch.tensor([55]))
    backend.reset()
    backend.forward(torch.tensor(prompt + [22, 33, 44, 55]))
    backend.truncate(len(prompt) + 3)
    fresh = backend.forward(torch.tensor([55]))
    from specdecode.backends.torch import kernels

    if kernels.rowwise_linear() is not None:
        # The kernels give a row the same bits whatever else shares its forward, and the kept
        # keys and values are the path's own: equal bits, as in the other cache tests.
        assert torch.equal(after_commit, fresh)
    else:  # library products round by batch shape (bfloat16): close, same argmax
        assert torch.allclose(after_commit, fresh, atol=0.3, rtol=0)
        assert after_commit.argmax() == fresh.argmax()


def test_truncate_then_decode_equals_fresh_decode(small_bf16: TorchBackend) -> None:
    backend = small_bf16
    ids = torch.randint(10, 100_000, (50,), generator=torch.Generator().manual_seed(5))
    backend.reset()
    fresh = backend.forward(ids)[-10:]
    backend.truncate(40)
    again = backend.forward(ids[40:])
    assert torch.equal(fresh, again)


def test_tiny_random_model_runs_every_family() -> None:
    for family in ("llama", "gemma3"):
        config = TransformerConfig(
            family=family,
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            sliding_window=16 if family == "gemma3" else None,
            query_pre_attn_scalar=8.0 if family == "gemma3" else None,
        )
        from specdecode.backends.torch.model import Transformer

        state = Transformer(config)
        for p in state.parameters():
            torch.nn.init.normal_(p, std=0.1)
        hf_names = to_hf_names(state, config)
        backend = TorchBackend(config, hf_names, dtype=torch.float32, max_context=64)
        logits = backend.forward(torch.arange(20))
        assert logits.shape == (20, 64) and torch.isfinite(logits).all()
        backend.truncate(10)
        assert torch.allclose(backend.forward(torch.arange(10, 20)), logits[10:], atol=1e-5)


def test_rowwise_kernel_is_built_with_its_weight_prefetch() -> None:
    """The kernel fetches the next weights into L2 while it computes; a compiler that dropped the
    fetch (GCC drops helpers whose only effect is a prefetch) would only show as a slowdown, so
    the built library is read for the instruction."""
    import shutil
    import subprocess

    from specdecode.backends.torch import kernels

    if kernels.rowwise_linear() is None:
        pytest.skip("the kernels need AVX-512 and a C++ compiler (the fallback is tested below)")
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is needed to read the built library")
    library = kernels._cache_dir() / "specdecode_kernels.so"
    listing = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert "prefetcht1" in listing.stdout


def test_a_cpu_without_avx512_falls_back_to_library_products_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The documented fallback, on any CPU: a warning that says why, and no kernels."""
    from specdecode.backends.torch import kernels

    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    monkeypatch.setattr(kernels, "_state", {})  # as in a fresh process
    with pytest.warns(RuntimeWarning, match="this CPU lacks"):
        assert kernels.rowwise_linear() is None
    assert kernels.rowwise_linear_int8() is None and kernels.rowwise_attention() is None


def test_rowwise_kernel_gives_every_row_the_same_bits_whatever_the_row_count() -> None:
    """The C++ kernel sums each output in a fixed order: a row's result is the same alone or in
    any batch, for ragged shapes too, and close to a float64 product."""
    from specdecode.backends.torch import kernels

    if not set(kernels.REQUIRED_CPU_FLAGS) <= kernels.cpu_flags():
        pytest.skip("the kernel needs AVX-512 (the fallback has its own test)")
    rowwise = kernels.rowwise_linear()
    assert rowwise is not None, "the kernel should compile on an AVX-512 CPU with a C++ compiler"
    torch.manual_seed(0)
    # bfloat16 rows (with bfloat16 weights) take the CPU's dot-product instruction where it has
    # one: another summation, held to the same promise.
    kinds = [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)]
    if kernels.takes_bfloat16_rows():
        kinds.append((torch.bfloat16, torch.bfloat16))
    for in_features, out_features in [(896, 4864), (100, 37), (4864, 9), (33, 5)]:
        for dtype, input_dtype in kinds:
            weight = (torch.randn(out_features, in_features) * 0.05).to(dtype)
            inputs = torch.randn(40, in_features) * torch.logspace(-2, 1, in_features)
            inputs = inputs.to(input_dtype)
            alone = torch.cat([rowwise(inputs[i : i + 1], weight) for i in range(40)])
            assert alone.dtype == torch.float32
            for rows in (2, 3, 4, 5, 7, 8, 13, 16, 40):
                assert torch.equal(rowwise(inputs[:rows], weight), alone[:rows]), rows
            exact = inputs.double() @ weight.double().T
            assert torch.allclose(alone.double(), exact, rtol=1e-4, atol=1e-4 * exact.abs().max())


def test_weights_packed_for_tiles_put_each_value_where_the_tile_instruction_reads_it() -> None:
    """Output n = 64 g + 16 j + c and input i = 32 s + 2 p + e of the weight sit at
    [g, j, s, p, 2 c + e] of the packed tensor, with zeros past the weight's edges."""
    from specdecode.backends.torch import kernels

    outputs, inputs = 70, 45  # ragged: 2 groups of 64 outputs, 2 steps of 32 inputs
    weight = torch.arange(outputs * inputs, dtype=torch.float32).view(outputs, inputs)
    packed = kernels.pack_for_tiles(weight.bfloat16())
    assert packed.shape == (2, 4, 2, 16, 32)
    exact = kernels.pack_for_tiles(weight)  # float32 holds the indices exactly
    for n, i in [(0, 0), (1, 0), (0, 1), (17, 3), (63, 31), (64, 32), (69, 44), (40, 33)]:
        g, j, c = n // 64, n % 64 // 16, n % 16
        s, p, e = i // 32, i % 32 // 2, i % 2
        assert exact[g, j, s, p, 2 * c + e] == weight[n, i], (n, i)
    assert exact.sum() == weight.sum()  # everything else is padding, and zero


def test_tile_kernel_gives_every_row_the_same_bits_whatever_the_row_count() -> None:
    """On a CPU with AMX, bfloat16 rows are multiplied by tiles of up to 16 rows, and one or two
    rows on the vector unit in the tile instruction's arithmetic: a row's result is the same
    alone, beside another, in a tile with others, or in a later tile of a larger product,
    denormals included; ragged shapes are padded with zeros; it is close to a float64 product."""
    from specdecode.backends.torch import kernels

    tiles = kernels.rowwise_linear_tiles()
    if tiles is None:
        pytest.skip("needs a CPU with AMX tile instructions (Intel Sapphire Rapids or later)")
    torch.manual_seed(0)
    for in_features, out_features in [(896, 4864), (100, 37), (4864, 9), (33, 5)]:
        weight = torch.randn(out_features, in_features) * 0.05
        weight[0] *= 1e-20  # with row 4 below: products under float32's normals, flushed to zero
        weight = weight.bfloat16()
        packed = kernels.pack_for_tiles(weight)
        inputs = torch.randn(40, in_features) * torch.logspace(-2, 1, in_features)
        inputs[3, ::7] = 1e-39  # bfloat16 denormals, which the tile instruction reads as zero
        inputs[4] *= 1e-17
        inputs = inputs.bfloat16()
        alone = torch.cat([tiles(inputs[i : i + 1], packed, out_features) for i in range(40)])
        assert alone.shape == (40, out_features) and alone.dtype == torch.float32
        for rows in (2, 3, 5, 8, 15, 16, 17, 31, 40):
            assert torch.equal(tiles(inputs[:rows], packed, out_features), alone[:rows]), rows
        exact = inputs.double() @ weight.double().T
        assert torch.allclose(alone.double(), exact, rtol=1e-4, atol=1e-4 * exact.abs().max())


def test_asking_for_tiles_without_amx_warns_once_and_keeps_the_dot_product_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from specdecode.backends.torch import kernels

    monkeypatch.setenv(kernels.TILES_ENV_SWITCH, "1")
    monkeypatch.setattr(kernels, "rowwise_linear_tiles", lambda: None)
    monkeypatch.setattr(kernels, "_state", {})  # as in a fresh process
    with pytest.warns(RuntimeWarning, match="SPECDECODE_TILES=1 is ignored"):
        assert not kernels.tiles_chosen()
    assert not kernels.tiles_chosen()  # decided once per process: no second warning


def test_batch_invariant_linear_takes_the_tiles_on_an_amx_cpu_and_repacks_a_changed_weight() -> (
    None
):
    from specdecode.backends.torch import invariance, kernels

    if kernels.rowwise_linear_tiles() is None:
        pytest.skip("needs a CPU with AMX tile instructions (Intel Sapphire Rapids or later)")
    torch.manual_seed(0)
    layer = invariance.BatchInvariantLinear(256, 96, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 256).bfloat16()
    with torch.inference_mode():
        out = layer(x)
        packed = kernels.pack_for_tiles(layer.weight)
        by_tiles = kernels.rowwise_linear_tiles()(x, packed, 96) + layer.bias
        assert torch.equal(out, by_tiles.bfloat16())
        layer.weight.mul_(2)  # in place: the packed copy must follow
        assert torch.equal(layer(x), (2 * by_tiles - layer.bias).bfloat16())


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "library-pieces"])
def test_batch_invariant_linear_gives_every_row_the_bits_of_a_one_token_forward(
    use_kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the kernel, or with library products split into pieces this CPU agrees on, a row's
    output has the bits of the same row in a one-token forward."""
    from specdecode.backends.torch import invariance

    if not use_kernel:
        monkeypatch.setattr(invariance, "kernel_applies", lambda weight: False)
    torch.manual_seed(0)
    layer = invariance.BatchInvariantLinear(4864, 896, bias=True).to(torch.bfloat16)
    for rows in range(1, 40):
        assert sum(layer.pieces(rows)) == rows
    inputs = (torch.randn(6, 17, 4864) * 0.05).to(torch.bfloat16)  # activations are small
    with torch.inference_mode():
        for batch in inputs:
            together = layer(batch)
            for i in range(batch.shape[0]):
                # A one-token forward is padded to two rows (model.py).
                alone = layer(batch[i : i + 1].repeat(2, 1))
                assert torch.equal(together[i], alone[0]), i


def test_int8_draft_weights_stay_close_to_the_float_model() -> None:
    from specdecode.backends.torch.quant import Int8Linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 512, bias=True)
    quantized = Int8Linear.from_linear(layer)
    x = torch.randn(5, 256)
    with torch.inference_mode():
        error = (quantized(x) - layer(x)).abs().max()
        scale = layer(x).abs().mean()
    assert quantized.weight.dtype == torch.int8
    assert error < 0.05 * scale  # per-channel int8 weights, bfloat16 activations


def test_byte_kernel_multiplies_rows_rounded_to_int8_by_int8_weights() -> None:
    """Where the CPU has integer dot products, a draft's int8 weights meet rows rounded to int8,
    each on its own scale: the result is that rounded product (integer sums are exact), for
    ragged shapes too, and a row's result does not depend on the rows beside it."""
    from specdecode.backends.torch import kernels

    in_bytes = kernels.rowwise_linear_int8()
    if kernels.VNNI_CPU_FLAG not in kernels.cpu_flags():
        assert in_bytes is None  # the draft's layers then keep float rows
        pytest.skip("the byte kernel needs AVX-512 VNNI (integer dot products)")
    assert in_bytes is not None, "the kernel should compile on a CPU with AVX-512 VNNI"
    torch.manual_seed(0)
    for in_features, out_features in [(896, 4864), (100, 37), (4864, 9), (33, 5), (130, 70)]:
        weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
        weight_scales = torch.rand(out_features) * 0.01
        weight_sums = weight.sum(dim=1, dtype=torch.int32)
        inputs = torch.randn(13, in_features) * torch.logspace(-2, 1, in_features)
        out = in_bytes(inputs, weight, weight_sums, weight_scales)
        row_scales = inputs.abs().amax(dim=1, keepdim=True) / 127
        rounded = torch.round(inputs / row_scales) * row_scales
        expected = rounded.double() @ (weight.double() * weight_scales.double()[:, None]).T
        assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max())
        for rows in (1, 2, 5, 7):
            alone = in_bytes(inputs[:rows], weight, weight_sums, weight_scales)
            assert torch.equal(alone, out[:rows])
    # A draft's layer takes this path for a prefill's many rows too (in chunks), and stays close
    # to the float layer.
    from specdecode.backends.torch.quant import Int8Linear

    layer = torch.nn.Linear(256, 512, bias=True)
    x = torch.randn(kernels.MAX_ROWS * 2 + 3, 256)
    with torch.inference_mode():
        out = Int8Linear.from_linear(layer)(x)
        assert torch.equal(out[-3:], Int8Linear.from_linear(layer)(x[-3:]))
        assert (out - layer(x)).abs().mean() < 0.01 * layer(x).abs().mean()


def test_partial_head_scores_its_tokens_as_the_full_head_and_the_rest_minus_infinity() -> None:
    from specdecode.backends.torch.quant import Int8Linear, PartialHead

    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 1000, bias=False).requires_grad_(False)
    for full in (Int8Linear.from_linear(layer), layer):
        head = PartialHead(full, torch.tensor([5, 1, 3, 999, 5000]))  # out of range: ignored
        x = torch.randn(3, 128)
        with torch.inference_mode():
            everything = full(x)
            scores = head(x)
            assert scores.shape == everything.shape
            kept = torch.tensor([1, 3, 5, 999])
            assert torch.allclose(scores[:, kept], everything[:, kept], rtol=1e-6, atol=1e-6)
            assert torch.isinf(scores).sum() == 3 * (1000 - 4)
            head.include(torch.tensor([[7, 3]]))  # fed tokens are scored from now on
            assert torch.allclose(head(x)[:, 7], everything[:, 7], rtol=1e-6, atol=1e-6)
            head.forget()  # a new sequence starts from the fixed set again
            assert torch.isinf(head(x)[:, 7]).all()
