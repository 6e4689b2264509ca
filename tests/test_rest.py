"""The datastore and the `rest` drafter (REST).

- The suffix array sorts every position by the text that starts there, separators first, and
  the longest match of a context is the longest suffix that occurs (both against brute force).
- Continuations are cut at their document's end, sampled evenly when there are many, and merged
  into a trie whose most frequent nodes are drafted (a chain follows the most frequent child).
- The file: written atomically, memory-mapped back, refused when made by another tokenizer,
  truncated or not a datastore; `specdecode datastore build` refuses an empty or binary corpus
  and an unreadable path in one line, and skips binary files inside folders.
- Greedy losslessness on a real model, chains and trees, with the corpus's copies accepted.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from certified import assert_certify_passes

from specdecode import SamplingParams, SpecConfig, SpecDecoder
from specdecode.cli import main
from specdecode.datastore import Datastore
from specdecode.drafters.rest import RestDrafter
from specdecode.errors import SpecDecodeError
from specdecode.tree import Budget

MODEL = "smollm2-135m-instruct"


def test_the_suffix_array_and_the_longest_match_agree_with_brute_force() -> None:
    rng = random.Random(1)
    for _ in range(200):
        documents = [[rng.randrange(3) for _ in range(rng.randrange(1, 15))] for _ in range(3)]
        datastore = Datastore.from_documents(documents, "v")
        text = datastore.tokens.tolist()
        # Python compares lists as the suffix array sorts: a prefix first, a separator (-1) first.
        assert datastore.suffixes.tolist() == sorted(range(len(text)), key=lambda i: text[i:])
        context = [rng.randrange(3) for _ in range(6)]
        length, lo, hi = datastore.longest_match(context, 5)
        longest = max((n for n in range(1, 6) if starts(text, context[-n:])), default=0)
        assert length == longest
        if length:
            assert sorted(datastore.suffixes[lo:hi].tolist()) == starts(text, context[-length:])


def starts(text: list[int], pattern: list[int]) -> list[int]:
    """Where `pattern` occurs in `text`, by brute force."""
    return [i for i in range(len(text)) if text[i : i + len(pattern)] == pattern]


def test_drafts_are_the_most_frequent_continuations() -> None:
    datastore = Datastore.from_documents(
        [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 5], [7, 1, 2, 6], [9, 1, 2]], "v"
    )
    drafter = RestDrafter(datastore, min_match=2, tree=True)
    # "1 2" occurs 5 times: followed by 3 (three times), 6 (once) and the end of a document.
    tree = drafter.propose([8, 1, 2], Budget(max_depth=2, max_width=2, max_nodes=4))
    assert tree.tokens.tolist() == [3, 4, 6, 5]
    assert tree.parents.tolist() == [-1, 0, -1, 0]
    assert tree.confidence.tolist() == pytest.approx([3 / 5, 2 / 3, 1 / 5, 1 / 3])
    chain = RestDrafter(datastore, min_match=2).propose([8, 1, 2], Budget.chain(3))
    assert chain.tokens.tolist() == [3, 4]  # every copy ends with its document
    assert drafter.propose([8, 2], Budget.chain(3)).num_nodes == 0  # below min_match
    # With many occurrences, an even sample keeps the proportions.
    many = Datastore.from_documents([[1, 2, 3]] * 300 + [[1, 2, 4]] * 100, "v")
    copies = many.continuations(*many.occurrences([1, 2]), offset=2, depth=1, most=40)
    assert len(copies) == 40 and copies.count([3]) == 30


def test_a_saved_datastore_maps_back_and_bad_files_are_refused(tmp_path) -> None:
    datastore = Datastore.from_documents([[5, 6, 7], [5, 6, 8]], "tok-a", "model-a")
    path = tmp_path / "corpus.datastore"
    datastore.save(path)
    loaded = Datastore.load(path, "tok-a")
    assert isinstance(loaded.tokens, np.memmap)
    assert loaded.tokens.tolist() == datastore.tokens.tolist()
    assert loaded.longest_match([9, 5, 6], 4)[0] == 2
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(SpecDecodeError, match="another tokenizer"):
        Datastore.load(path, "tok-b")
    truncated = tmp_path / "truncated.datastore"
    truncated.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(SpecDecodeError, match="truncated"):
        Datastore.load(truncated, "tok-a")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(SpecDecodeError, match="not a datastore"):
        Datastore.load(other, "tok-a")
    with pytest.raises(SpecDecodeError, match="cannot read"):
        Datastore.load(tmp_path / "missing", "tok-a")
    with pytest.raises(SpecDecodeError, match="no text"):
        Datastore.from_documents([[], []], "tok-a")


def test_build_refuses_bad_input_in_one_line(tmp_path, capsys) -> None:
    out = str(tmp_path / "out.datastore")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    cases = [
        ([str(empty)], "no text"),
        ([str(binary)], "not a text file"),
        ([str(tmp_path / "missing.txt")], "no such file"),
    ]
    for files, message in cases:
        assert main(["datastore", "build", *files, "--out", out, "--model", MODEL]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error:") and message in error
    assert not (tmp_path / "out.datastore").exists()
    assert main(["datastore", "build", "--out", out]) == 2  # no files: usage error


def test_build_skips_binary_files_in_folders_and_refuses_another_tokenizer(
    tmp_path, capsys
) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.py").write_text("def area(width, height):\n    return width * height\n")
    (folder / "blob.bin").write_bytes(b"\x00\xff" * 50)
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[core]\n\trepositoryformatversion = 0\n")
    out = tmp_path / "code.datastore"
    assert main(["datastore", "build", str(folder), "--out", str(out), "--model", MODEL]) == 0
    assert "from 1 files" in capsys.readouterr().out
    from specdecode.models import load_tokenizer

    assert Datastore.load(out, load_tokenizer(MODEL).fingerprint).num_tokens > 10
    with pytest.raises(SpecDecodeError, match="another tokenizer"):
        Datastore.load(out, load_tokenizer("qwen2.5-coder-0.5b-instruct").fingerprint)


@pytest.fixture(scope="module")
def llm() -> SpecDecoder:
    return SpecDecoder.load(MODEL)


PROMPT = "Write a Python function that returns the squares of a list of numbers."


@pytest.mark.parametrize("tree", ["chain", "static"])
def test_greedy_is_exact_with_the_corpus_copies_accepted(
    llm: SpecDecoder, tree: str, tmp_path
) -> None:
    sampling = SamplingParams(max_new_tokens=48)
    plain = llm.generate(PROMPT, sampling, SpecConfig(drafter="none"))
    # A corpus holding an answer like the model's (and unrelated text): its copies are drafted.
    (tmp_path / "answer.md").write_text(plain.text)
    (tmp_path / "other.md").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    path = tmp_path / "corpus.datastore"
    assert main(["datastore", "build", str(tmp_path), "--out", str(path), "--model", MODEL]) == 0
    spec = SpecConfig(
        drafter="rest", tree=tree, tree_width=2, drafter_options={"datastore": str(path)}
    )
    fast = llm.generate(PROMPT, sampling, spec)
    assert fast.token_ids == plain.token_ids
    assert fast.stats.mean_accepted_tokens > 3.0


def test_rest_without_a_datastore_is_one_clear_error(capsys, tmp_path) -> None:
    assert main(["generate", "--model", MODEL, "--drafter", "rest", "hi"]) == 2
    assert "--datastore FILE" in capsys.readouterr().err
    # A missing or foreign file is refused before the model loads (a model that does not exist
    # would fail later, with another message).
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    for path, message in ((tmp_path / "missing", "cannot read"), (notes, "not a datastore")):
        args = ["generate", "--model", "no-such-model", "--drafter", "rest", "--datastore"]
        assert main([*args, str(path), "hi"]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_sampling_passes_certify(llm: SpecDecoder, tmp_path) -> None:
    (tmp_path / "fruits.txt").write_text(
        "Random fruits: apple, pear, apple, plum, pear, apple, fig, plum, apple, pear, fig, "
        "apple, plum, apple, pear, apple, fig, pear, plum, apple, apple, pear, fig, plum."
    )
    path = tmp_path / "fruits.datastore"
    assert main(["datastore", "build", str(tmp_path), "--out", str(path), "--model", MODEL]) == 0
    options = {"datastore": str(path), "min_match": 1}
    spec = SpecConfig(
        drafter="rest", controller="fixed", num_draft_tokens=3, drafter_options=options
    )
    assert_certify_passes(llm, spec)
