"""`specdecode datastore build`: tokenize a corpus and index it for the `rest` drafter."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from specdecode.errors import SpecDecodeError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "datastore",
        help="build a datastore of text for the rest drafter",
        description="Datastores: a corpus tokenized with a model's tokenizer and indexed by its "
        "suffix array, for `--drafter rest --datastore FILE`.",
    )
    dsub = p.add_subparsers(dest="datastore_cmd", metavar="ACTION")
    build = dsub.add_parser(
        "build",
        help="tokenize text files and index them",
        description="Tokenize FILES (text files, or folders searched for them, hidden ones such "
        "as .git left out; each file is one "
        "document) with MODEL's tokenizer and write one memory-mapped file: the token ids and "
        "their suffix array, with the tokenizer's identity (a datastore is refused with another "
        "model's tokenizer). Binary files inside folders are skipped; named ones are refused.",
    )
    build.add_argument("files", nargs="+", metavar="FILES", help="text files or folders")
    build.add_argument("--out", required=True, metavar="FILE", help="the datastore to write")
    build.add_argument(
        "--model",
        default="qwen2.5-coder-1.5b-instruct",
        help="whose tokenizer (registry name, GGUF file or model directory; default: "
        "qwen2.5-coder-1.5b-instruct)",
    )
    build.set_defaults(func=run_build)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_build(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from specdecode.datastore import Datastore
    from specdecode.models import load_tokenizer

    out = Path(args.out).expanduser()
    if not out.parent.is_dir():
        raise SpecDecodeError(f"cannot write {out}: {out.parent} is not a directory")
    files = list(_text_files([Path(f).expanduser() for f in args.files]))
    if not files:
        raise SpecDecodeError("no text files found in " + ", ".join(args.files))
    tokenizer = load_tokenizer(args.model)
    started = time.perf_counter()
    documents = []
    for path, named in tqdm(files, desc="tokenize", unit="file", file=sys.stderr):
        text = _read_text(path, named)
        if text:
            documents.append(tokenizer.encode(text, add_special_tokens=False))
    print("indexing ...", file=sys.stderr)
    datastore = Datastore.from_documents(documents, tokenizer.fingerprint, str(args.model))
    datastore.save(out)
    seconds = time.perf_counter() - started
    tokens = sum(len(document) for document in documents)
    size = out.stat().st_size / 2**20
    print(
        f"{out}: {tokens:,} tokens from {len(documents)} files, {size:.1f} MiB, in {seconds:.1f} s"
    )
    return 0


def _text_files(paths: list[Path]) -> Iterator[tuple[Path, bool]]:
    """(path, named): named files (each must be readable text) and the text files inside named
    folders."""
    for path in paths:
        if path.is_dir():
            for inner in sorted(path.rglob("*")):
                hidden = any(part.startswith(".") for part in inner.relative_to(path).parts)
                if not hidden and inner.is_file() and _is_text(inner):
                    yield inner, False
        elif path.is_file():
            if not _is_text(path):
                raise SpecDecodeError(f"{path} is not a text file (binary or not UTF-8)")
            yield path, True
        else:
            raise SpecDecodeError(f"cannot read {path}: no such file or folder")


def _is_text(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            head = file.read(8192)
    except OSError as exc:
        raise SpecDecodeError(f"cannot read {path}: {exc.strerror}") from None
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start > len(head) - 4  # a character cut at the end of the sample is fine
    return True


def _read_text(path: Path, named: bool) -> str:
    """The file's text; "" for a file found in a folder that turns out not to be UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        if not named:
            return ""
        raise SpecDecodeError(f"{path} is not a text file (binary or not UTF-8)") from None
    except OSError as exc:
        raise SpecDecodeError(f"cannot read {path}: {exc.strerror}") from None
