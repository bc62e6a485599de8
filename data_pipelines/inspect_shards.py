"""Inspect a directory of shards: what it holds, what is wrong with it, and how it would pack.

Reads every ``*.tar`` directly (no ``.idx`` needed) and reports problems instead of raising. The
vocabulary is ``--vocab`` if given, else the one the shards' ``.idx`` files record (``emu3``, with
a note on stderr, when none does; an error when they disagree). Keys:

- ``vocab``, ``vocab_source`` (``--vocab``, ``index`` or ``default``);
- ``documents``, ``tokens``, ``documents_by_task``, ``tokens_by_task``;
- ``tokens_by_modality``: ``text`` (BPE/byte ids), ``vision`` (visual codes), ``special`` (BOS,
  EOS, SOV, EOL, ...), ``invalid`` (outside the vocabulary);
- ``lengths`` (min/mean/median/p99/max) and ``length_histogram`` (log-spaced bins; ``--histogram
  PATH`` draws it as a PNG);
- ``vocab_violations``: documents with an id outside the vocabulary (+ ``*_examples``);
- ``malformed_vision_blocks``: documents whose blocks are broken: SOV without EOV, no SOT, meta
  that is neither image ``h*w`` nor video ``t*h*w {fps}fps {duration}s`` (``emu3_train.layout``)
  or that the rows or frames contradict, rows without EOL, frames without EOF, visual codes
  outside a block (+ examples);
- ``video_blocks``, ``video_seconds``, ``video_fps``: vision blocks with video meta, the seconds
  their meta adds up to, and how many blocks each frame rate has (``{"8": 120}``);
- ``unreadable``: samples that do not decode, miss a member, or a shard cut short (+ examples);
- ``checksum_mismatches``: samples whose CRC-32 differs from the ``.idx`` (training rejects them);
- ``index_mismatches``: samples in the tar but not in its ``.idx`` (never trained on: e.g. appended
  into the end padding), listed but absent or elsewhere; an unreadable, stale or other-vocab ``.idx``;
- ``shards_without_index``: shards whose ``.idx`` is missing or out of date (the trainer needs it);
- with ``--seq-len N``, the rows the training loader would serve first over the well-formed
  documents, planned by the loader's own ``RowStream`` (``inspect_packing``: ``--seed``,
  ``--pack-window``, ``--shard-group``, ``--tasks`` as ``data.*``, oversize policy ``skip``): ``fill``
  (token fraction of the rows: the loader's ``data/fill`` over them), ``rows``, ``docs_per_row``
  (pieces per row), ``split_vision_blocks`` (blocks a piece boundary cuts: must be 0), ``skipped``
  (documents dropped for a block longer than N, as the loader counts them), ``split_documents``
  (cuts), ``epochs_planned``.

``--json`` prints exactly one JSON object with these keys on stdout. Exit code 0 when nothing is
wrong, 1 when a problem was found, 2 when the directory cannot be inspected.

    python -m emu3_train.data_pipelines.inspect_shards data/mine --seq-len 4096 --histogram lengths.png
    python -m emu3_train.data_pipelines.inspect_shards data/mine --vocab emu3 --seq-len 4096 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from emu3_train.data.format import META_SUFFIX, TASKS, TOKENS_SUFFIX, check_tokens, decode_meta, decode_tokens
from emu3_train.data.index import Index, ShardError, index_path, load_index, read_index
from emu3_train.layout import VisionMeta, format_meta, parse_vision_block_meta, vision_spans
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import PRESETS, Vocab, get_vocab

from ._cli import run_cli
from .index_shards import index_is_current, read_shard  # emu3_train.data_pipelines (from data_pipelines/)
from .inspect_packing import InspectedSource, packing_report

PROBLEMS = ("vocab_violations", "malformed_vision_blocks", "unreadable", "checksum_mismatches",
            "index_mismatches")
DEFAULT_VOCAB = "emu3"  # when neither --vocab nor any .idx names one


def structure_problem(tokens: np.ndarray, vocab: Vocab, decode) -> tuple[str | None, np.ndarray,
                                                                          list[VisionMeta]]:
    """``(what is wrong with the vision blocks or None, [m, 2] spans, each block's meta)``; ids
    outside the vocabulary are left to the caller (only the blocks' structure is judged here)."""
    try:
        valid = vocab.first_invalid(tokens) < 0
        spans = check_tokens(tokens, vocab) if valid else vision_spans(tokens, vocab)
    except ValueError as e:
        return str(e), np.zeros((0, 2), np.int64), []
    metas = []
    for s, e in spans:
        try:
            metas.append(parse_vision_block_meta(tokens[s:e], vocab, decode)[1])
        except ValueError as err:
            return f"vision block [{s}, {e}): {err}", spans, metas
    return None, spans, metas


class Inspection:
    """Running statistics of the samples seen (see the module docstring for every key)."""

    def __init__(self, vocab: Vocab, max_examples: int = 5):
        self.vocab = vocab
        self.decode = load_tokenizer(vocab).decode
        self.max_examples = max_examples
        self.docs_by_task: Counter = Counter()
        self.tokens_by_task: Counter = Counter()
        self.modality: Counter = Counter(text=0, vision=0, special=0, invalid=0)
        self.lengths: list[int] = []
        self.counts = dict.fromkeys(PROBLEMS, 0)
        self.examples: dict[str, list[str]] = {p: [] for p in PROBLEMS}
        self.packable = InspectedSource()  # the well-formed documents, for the packing report
        self.video_fps: Counter = Counter()  # video-meta blocks per frame rate (its meta text)
        self.video_seconds = 0.0

    def problem(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < self.max_examples:
            self.examples[kind].append(message)

    def add(self, where: str, members: dict[str, bytes]) -> None:
        """Check and count one sample; ``where`` is ``"shard: sample 'key'"``."""
        unexpected = sorted(set(members) - {TOKENS_SUFFIX, META_SUFFIX})
        missing = [s for s in (TOKENS_SUFFIX, META_SUFFIX) if s not in members]
        if unexpected or missing:
            what = f"unexpected member .{unexpected[0]}" if unexpected else f"member .{missing[0]} is missing"
            return self.problem("unreadable", f"{where}: {what}")
        try:
            tokens = decode_tokens(members[TOKENS_SUFFIX])
            task = decode_meta(members[META_SUFFIX])["task"]
            if not len(tokens):
                raise ValueError("document has no tokens")
        except ValueError as e:
            return self.problem("unreadable", f"{where}: {e}")
        v = self.vocab
        n = len(tokens)
        self.docs_by_task[task] += 1
        self.tokens_by_task[task] += n
        self.lengths.append(n)
        valid = (tokens >= 0) & (tokens < v.size)
        vision = int(np.count_nonzero(valid & (tokens >= v.vision_start)))
        text = int(np.count_nonzero(valid & (tokens < v.text_size)))
        self.modality.update(text=text, vision=vision, special=int(valid.sum()) - text - vision,
                             invalid=n - int(valid.sum()))
        bad = v.first_invalid(tokens)
        if bad >= 0:
            self.problem("vocab_violations", f"{where}: token id {int(tokens[bad])} at position {bad} is "
                                             f"outside vocabulary {v.name!r} (size {v.size})")
        malformed, spans, metas = structure_problem(tokens, v, self.decode)
        if malformed is not None:
            self.problem("malformed_vision_blocks", f"{where}: {malformed}")
        if bad < 0 and malformed is None:
            self.packable.add(n, spans, task, where)
            for m in (m for m in metas if m.is_video):
                self.video_fps[format_meta(m).split(" ")[1].removesuffix("fps")] += 1
                self.video_seconds += m.duration

    def report(self) -> dict:
        lengths = np.asarray(self.lengths, np.int64)
        out = {
            "documents": int(len(lengths)), "tokens": int(lengths.sum()),
            "documents_by_task": dict(sorted(self.docs_by_task.items())),
            "tokens_by_task": dict(sorted(self.tokens_by_task.items())),
            "tokens_by_modality": dict(self.modality),
            "lengths": ({"min": int(lengths.min()), "mean": float(lengths.mean()),
                         "median": float(np.median(lengths)), "p99": float(np.percentile(lengths, 99)),
                         "max": int(lengths.max())} if len(lengths) else {}),
            "length_histogram": length_histogram(lengths),
            "video_blocks": sum(self.video_fps.values()), "video_seconds": round(self.video_seconds, 3),
            "video_fps": dict(sorted(self.video_fps.items(), key=lambda kv: float(kv[0]))),
        }
        for kind in PROBLEMS:
            out[kind] = self.counts[kind]
            out[f"{kind}_examples"] = self.examples[kind]
        return out


def compare_with_index(ins: Inspection, index: Index, i: int | None, where: str, members: dict[str, bytes],
                       offsets: dict[str, int]) -> None:
    """Count the ways a sample read from the tar differs from its entry ``i`` (None: absent) in ``index``."""
    if i is None:
        return ins.problem("index_mismatches", f"{where}: in the tar but not in its index "
                           f"{index_path(index.path)}: training never reads it (added after indexing?); "
                           "reindex")
    key = str(index.keys[i])
    for suffix, offset, crc in ((TOKENS_SUFFIX, index.tokens_offset, index.tokens_crc32),
                                (META_SUFFIX, index.meta_offset, index.meta_crc32)):
        if suffix not in members:
            continue  # counted as unreadable
        if offsets[suffix] != int(offset[i]):
            return ins.problem("index_mismatches", f"{where}: {key}.{suffix} is at byte {offsets[suffix]}, "
                                                   f"its index says {int(offset[i])}; reindex the shard")
        got = zlib.crc32(members[suffix])
        if got != int(crc[i]):
            return ins.problem("checksum_mismatches", f"{where}: {key}.{suffix} has CRC-32 {got:08x}, "
                               f"its index says {int(crc[i]):08x}: changed after indexing, training "
                               "rejects it")


def resolve_vocab(name: str | None, indexes: dict[Path, Index]) -> tuple[Vocab, str]:
    """``(vocabulary, where it came from)``: ``name`` if given, else the one every index records."""
    if name is not None:
        return get_vocab(name), "--vocab"
    names = {i.vocab_name for i in indexes.values()}
    if len(names) > 1:
        which = ", ".join(sorted({f"{index_path(t).name} {i.vocab_name!r}" for t, i in indexes.items()}))
        raise ValueError(f"the shards were indexed for different vocabularies ({which}); pass --vocab")
    if not names:
        return get_vocab(DEFAULT_VOCAB), "default"
    name = names.pop()
    if name not in PRESETS:
        raise ValueError(f"the .idx files record vocabulary {name!r}, not a preset {sorted(PRESETS)}; "
                         "pass --vocab")
    return get_vocab(name), "index"


def length_histogram(lengths: np.ndarray) -> dict:
    """``{"edges": [K+1], "counts": [K]}``: half-octave bins ``[2^(k/2), 2^((k+1)/2))`` of tokens
    (rounded), from the bin of the shortest document to that of the longest."""
    if not len(lengths):
        return {"edges": [], "counts": []}
    first = int(np.floor(2 * np.log2(max(int(lengths.min()), 1))))
    last = int(np.ceil(2 * np.log2(int(lengths.max()) + 1)))
    edges = np.unique(np.round(2.0 ** (np.arange(first, last + 1) / 2)).astype(np.int64))
    counts, _ = np.histogram(lengths, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def draw_histogram(hist: dict, path: Path, title: str) -> Path:
    """A bar chart PNG of ``length_histogram`` (drawn with PIL: no plotting dependency)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, bottom, top = 900, 420, 70, 50, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 12), title, fill="black", font=font)
    edges, counts = hist["edges"], hist["counts"]
    plot_w, plot_h = width - left - 20, height - top - bottom
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    peak = max(counts, default=0) or 1
    for y in range(5):  # count gridlines
        value = peak * y / 4
        yy = top + plot_h - plot_h * y / 4
        draw.line([(left - 4, yy), (left, yy)], fill="black")
        draw.text((4, yy - 6), f"{value:.3g}" if peak < 100 else f"{value:,.0f}", fill="black", font=font)
    bar_w = plot_w / max(len(counts), 1)
    for i, c in enumerate(counts):
        x0 = left + i * bar_w
        draw.rectangle([x0 + 1, top + plot_h - plot_h * c / peak, x0 + bar_w - 1, top + plot_h],
                       fill=(70, 110, 180))
        if i % max(1, len(counts) // 12) == 0:  # label about a dozen bars with their lower edge
            draw.text((x0, top + plot_h + 6), f"{edges[i]:,}", fill="black", font=font)
    draw.text((left + plot_w // 2 - 60, height - 18), "document length (tokens)", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def inspect_shards(shard_dir: Path, vocab: Vocab | str | None = None, max_examples: int = 5,
                   progress: bool = False) -> tuple[dict, InspectedSource]:
    """``(report, packable)``: the statistics of every shard in ``shard_dir`` and its well-formed
    documents (for ``inspect_packing.packing_report``). ``vocab`` None: the one the indexes record."""
    if not shard_dir.is_dir():
        raise FileNotFoundError(f"shard directory not found: {shard_dir}")
    tars = sorted(shard_dir.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no *.tar shards in {shard_dir}")
    from tqdm import tqdm

    indexes: dict[Path, Index | str] = {}  # the index, or why it is unreadable
    for tar in (t for t in tars if index_path(t).is_file()):
        try:
            indexes[tar] = load_index(tar)
        except ShardError as e:
            indexes[tar] = str(e)
    readable = {t: i for t, i in indexes.items() if isinstance(i, Index)}
    vocab, source = resolve_vocab(vocab.name if isinstance(vocab, Vocab) else vocab, readable)
    ins = Inspection(vocab, max_examples)
    for message in (i for i in indexes.values() if isinstance(i, str)):
        ins.problem("index_mismatches", message)
    without_index = 0
    for tar in tqdm(tars, desc="inspecting", unit="shard", file=sys.stderr, disable=not progress):
        seen: set[str] = set()
        index = readable.get(tar)
        position = {str(k): i for i, k in enumerate(index.keys)} if index is not None else {}
        before = ins.counts["index_mismatches"] + ins.counts["checksum_mismatches"]
        try:
            for key, members, offsets in read_shard(tar):
                where = f"{tar}: sample {key!r}"
                if key in seen:
                    ins.problem("unreadable", f"{where}: key appears twice (or its members are not adjacent)")
                    continue
                seen.add(key)
                ins.add(where, members)
                if index is not None:
                    compare_with_index(ins, index, position.get(key), where, members, offsets)
        except (tarfile.TarError, OSError, EOFError) as e:
            ins.problem("unreadable", f"{tar}: not a complete uncompressed tar: {e}")
        if index is not None:
            for key in (k for k in position if k not in seen):
                ins.problem("index_mismatches", f"{tar}: sample {key!r}: listed in its index "
                            f"{index_path(tar)} but not read from the tar (lost after indexing?)")
            if ins.counts["index_mismatches"] + ins.counts["checksum_mismatches"] == before:
                try:  # what the samples did not show: size, appended data, another vocabulary
                    read_index(tar, vocab)
                except (ShardError, OSError) as e:
                    ins.problem("index_mismatches", str(e))
        without_index += not index_is_current(tar, vocab)
        ins.packable.end_shard()
    report = {"shards": len(tars), "vocab": vocab.name, "vocab_source": source, **ins.report(),
              "shards_without_index": without_index}
    return report, ins.packable


def _text_report(r: dict, shard_dir: Path) -> str:
    def share(n: int, total: int) -> str:
        return f"{n:,} ({100 * n / total:.1f}%)" if total else f"{n:,}"

    lines = [f"{shard_dir}: {r['shards']} shards ({r['shards_without_index']} without an up-to-date .idx), "
             f"vocabulary {r['vocab']!r} (from {r['vocab_source']})",
             f"documents: {r['documents']:,}  tokens: {r['tokens']:,}"]
    lines += [f"  {t}: {r['documents_by_task'][t]:,} documents, tokens {share(n, r['tokens'])}"
              for t, n in r["tokens_by_task"].items()]
    lines.append("tokens by modality: " + ", ".join(f"{m} {share(n, r['tokens'])}"
                                                    for m, n in r["tokens_by_modality"].items()))
    if r["video_blocks"]:
        lines.append(f"video: {r['video_blocks']:,} blocks, {r['video_seconds']:,.1f} s, by fps "
                     + ", ".join(f"{fps}: {n:,}" for fps, n in r["video_fps"].items()))
    if r["lengths"]:
        lines.append("lengths: " + ", ".join(f"{k} {v:,.0f}" for k, v in r["lengths"].items()))
    for kind in PROBLEMS:
        lines.append(f"{kind.replace('_', ' ')}: {r[kind]:,}")
        lines += [f"  {ex}" for ex in r[f"{kind}_examples"]]
    if "seq_len" in r:
        lines.append(f"packing at seq_len {r['seq_len']:,}: fill {r['fill']:.3f}, rows {r['rows']:,}, "
                     f"docs/row {r['docs_per_row']:.2f}, split vision blocks {r['split_vision_blocks']}, "
                     f"skipped {r['skipped']:,}, split documents {r['split_documents']:,} "
                     f"({r['epochs_planned']:.2f} epochs planned)")
    if "histogram" in r:
        lines.append(f"length histogram: {r['histogram']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.data_pipelines.inspect_shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Statistics, vocabulary violations, malformed vision blocks and packing of a directory "
                    "of shards.",
        epilog="example:\n  python -m emu3_train.data_pipelines.inspect_shards data/mine --seq-len 4096 "
               "--histogram lengths.png\nexit code: 0 clean, 1 problems found, 2 cannot inspect",
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="directory of *.tar shards")
    parser.add_argument("--vocab", default=None, choices=sorted(PRESETS),
                        help=f"vocabulary preset (default: what the .idx files record, else {DEFAULT_VOCAB})")
    parser.add_argument("--seq-len", type=int, default=None, help="also report packing into rows of N tokens")
    parser.add_argument("--pack-window", type=int, default=256,
                        help="documents packed together (data.pack_window, default 256)")
    parser.add_argument("--seed", type=int, default=0, help="data order seed (data.seed, default 0)")
    parser.add_argument("--shard-group", type=int, default=0,
                        help="shards shuffled together per epoch (data.shard_group, default 0 = all)")
    parser.add_argument("--tasks", default="", metavar="T1,T2",
                        help="tasks the run trains on (data.tasks, e.g. t2i,i2t; default all)")
    parser.add_argument("--histogram", type=Path, default=None, metavar="PNG",
                        help="draw the length histogram")
    parser.add_argument("--examples", type=int, default=5, help="examples kept per problem (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object, nothing else, on stdout")
    args = parser.parse_args(argv)
    if args.seq_len is not None and args.seq_len <= 0 or args.pack_window <= 0 or args.shard_group < 0:
        parser.error("--seq-len and --pack-window must be positive, --shard-group >= 0")
    tasks = [t for t in args.tasks.split(",") if t]
    if sorted(set(tasks) - set(TASKS)):
        parser.error(f"--tasks {args.tasks!r}: each task must be one of {', '.join(TASKS)}")
    report, packable = inspect_shards(args.dir, args.vocab, args.examples, progress=True)
    if report["vocab_source"] == "default":
        print(f"note: no --vocab and no .idx in {args.dir} records a vocabulary; inspecting with "
              f"--vocab {DEFAULT_VOCAB}", file=sys.stderr)
    if args.seq_len is not None:
        report.update(packing_report(packable, args.seq_len, args.pack_window, args.seed, args.shard_group,
                                     tasks))
    if args.histogram is not None:
        title = f"{args.dir}: {report['documents']:,} documents, {report['tokens']:,} tokens"
        report["histogram"] = str(draw_histogram(report["length_histogram"], args.histogram, title))
    problems = sum(report[k] for k in PROBLEMS) + report.get("split_vision_blocks", 0)
    if args.json:
        print(json.dumps(report))
    else:
        print(_text_report(report, args.dir))
        print(f"inspected {report['documents']:,} documents ({report['tokens']:,} tokens) in "
              f"{report['shards']} shards: {report['vocab_violations']} vocabulary violations, "
              f"{report['malformed_vision_blocks']} malformed vision blocks, "
              f"{report['unreadable']} unreadable, {report['checksum_mismatches']} checksum mismatches, "
              f"{report['index_mismatches']} index mismatches")
    return 1 if problems else 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with a directory that cannot be inspected reported as one ``error:`` line (exit 2)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
