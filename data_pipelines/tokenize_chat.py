"""Tokenize LLaVA-format conversations into Emu3-Chat documents, straight into token shards.

    # LLaVA-1.5's instruction data: images relative to --image-folder, one worker
    python -m emu3_train.data_pipelines.tokenize_chat --input llava_v1_5_mix665k.json \\
        --image-folder /data/llava --vq /models/Emu3-VisionTokenizer-hf --out data/chat
    # one node, one worker per GPU (workers take every N-th piece of every input)
    torchrun --nproc-per-node 8 -m emu3_train.data_pipelines.tokenize_chat --input 'chat/*.jsonl' \\
        --image-folder /data/images --vq /models/Emu3-VisionTokenizer-hf --out data/chat

Input: ``.json`` files holding a list of conversations, or ``.jsonl`` files with one per line,
LLaVA's format: ``{"id": ..., "image": PATH, "conversations": [{"from": "human", "value":
"<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}``; ``from`` is ``human``/``user``
or ``gpt``/``assistant`` (alternating, the user first; a leading ``system`` message replaces the
system line); without ``image`` a text-only conversation. Each input file is cut into pieces of
``--items-per-shard`` conversations, named ``<file name>_00000``, ``_00001``, ...: one output
shard set each (``data_pipelines.shard_output``: ``OUT/NAME-000000.tar`` + ``.idx``, then
``OUT/NAME.stats.json``), so reruns skip finished pieces and redo half-done ones, and worker ``i``
of ``N`` (``--rank/--world-size``, else torchrun's or slurm's environment) takes pieces ``i, i+N, ...``.

Documents (``emu3_train.chat``): ``BOS "You are a helpful assistant. USER: " <image block>
question ". ASSISTANT:" " answer" EOS`` and ``" USER: " ... EOS`` per further turn; the image block
opens the turn whose text held ``<image>`` (the placeholder and the whitespace around it are
removed). ``loss_spans`` cover the answers (with their EOS) only. Keys are the conversation's
position in its file (``000000042``); the json holds ``task`` (``i2t`` with an image, else
``text``), ``source`` (``<file name>/<position>``), ``turns``, ``id`` and ``image`` when given.

Images go through Emu3's processor and VQ-VAE (``emu3_train.vq``, decoded and converted in
``--workers`` processes by ``data_pipelines.decode_pool``) with the understanding resize range:
images below ``--min-pixels`` (512²) or above ``--max-pixels`` (1024²) are resized into it,
keeping the aspect ratio, sides multiples of 8.

Bad conversations are skipped and counted by reason with the file and position named
(``--on-error error``: stop at the first with one line): ``bad_json``, ``bad_conversation``,
``unknown_role``, ``turns_out_of_order``, ``no_assistant_turn``, ``unanswered_turn``,
``empty_turn``, ``placeholder_without_image``, ``image_without_placeholder``,
``several_placeholders``, ``placeholder_in_answer``, ``several_images``, ``missing_image``,
``undecodable``; the size filters (``too_wide``) are counted too.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from emu3_train.chat import SYSTEM, Turn, chat_document
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import PRESETS, get_vocab

from ._cli import run_cli
from .chat_inputs import IMAGE_PLACEHOLDER, BadConversation, Conversation, load_records, parse_conversation
from .decode_pool import DecodePool, DecodeSpec
from .image_inputs import Item
from .shard_output import DEFAULT_MAX_COUNT, ShardSetWriter, is_done
from .tokenize_images import InOrder, ShapeBatcher
from .work import Skips, add_worker_args, expand_inputs, input_name, local_device, my_share, worker_identity

UNDERSTANDING_MIN_PIXELS = 512 * 512
UNDERSTANDING_MAX_PIXELS = 1024 * 1024


@dataclass(frozen=True)
class Piece:
    """``--items-per-shard`` conversations of one input file: one output shard set."""

    name: str
    path: Path
    start: int
    stop: int


def pieces(files: list[Path], per_piece: int) -> list[Piece]:
    """Every input file cut into pieces of ``per_piece`` conversations (a file with none: one piece)."""
    out = []
    for path in files:
        n = len(load_records(path))
        for k, start in enumerate(range(0, max(n, 1), per_piece)):
            out.append(Piece(f"{input_name(path)}_{k:05d}", path, start, min(start + per_piece, n)))
    return out


class ChatTokenizer:
    """One worker's state: the VQ, the text tokenizer and the counts over its pieces."""

    def __init__(self, vt, vocab, tokenizer, spec: DecodeSpec, out_dir: Path, image_folder: Path | None,
                 on_error: str = "skip", max_shard_docs: int = DEFAULT_MAX_COUNT):
        if vt is not None and vt.codebook_size > vocab.codebook_size:
            raise ValueError(f"the VQ-VAE has {vt.codebook_size} codes, vocabulary {vocab.name!r} only "
                             f"{vocab.codebook_size}")
        self.vt, self.vocab, self.encode, self.spec = vt, vocab, tokenizer.encode, spec
        self.out_dir, self.image_folder, self.on_error = Path(out_dir), image_folder, on_error
        self.max_shard_docs = max_shard_docs
        self.skips = Skips(on_error)
        self.counts: Counter = Counter()
        self._records: tuple[Path, list] | None = None  # the last input file read (pieces share it)

    def _file_records(self, path: Path) -> list:
        if self._records is None or self._records[0] != path:
            self._records = (path, load_records(path))
        return self._records[1]

    def _document(self, name: str, index: int, conv: Conversation, codes=None) -> tuple:
        doc = chat_document(self.vocab, self.encode, conv.turns, codes, conv.image_turn, conv.system)
        meta = {"task": "i2t" if codes is not None else "text", "source": f"{name}/{index}",
                "loss_spans": doc.loss_spans, "turns": len(conv.turns)}
        if conv.id is not None:
            meta["id"] = conv.id
        if conv.image is not None:
            meta["image"] = conv.image
        return f"{index:09d}", doc.tokens, meta

    def run_piece(self, piece: Piece, pool: DecodePool, progress=None) -> dict:
        """Tokenize one piece into its shard set; returns its stats (``NAME.stats.json``)."""
        records = self._file_records(piece.path)
        skips, counts = Skips(self.on_error), Counter()
        base = input_name(piece.path)
        pending: dict[int, Conversation] = {}
        with ShardSetWriter(self.out_dir, piece.name, self.vocab, input_path=piece.path,
                            max_count=self.max_shard_docs) as writer:
            def write(docs):
                for key, tokens, meta in docs:
                    writer.add(tokens, meta, key=key)

            order = InOrder(write)

            def emit(ordinal, item, grid):
                conv = pending.pop(ordinal)
                counts["images"] += 1
                order.put(ordinal, [self._document(base, piece.start + ordinal, conv, grid)])

            def image_items():
                """Parses every conversation; text-only ones are written at once, images go to the pool."""
                for ordinal, index in enumerate(range(piece.start, piece.stop)):
                    where = f"{piece.path}:{index}"
                    try:
                        conv = parse_conversation(records[index], self.image_folder)
                    except BadConversation as e:
                        skips.bad(e.reason, where, str(e))
                        order.put(ordinal, [])
                        if progress is not None:
                            progress(1)
                        continue
                    where += f" (id {conv.id})" if conv.id is not None else ""
                    if conv.image is None:
                        order.put(ordinal, [self._document(base, index, conv)])
                        if progress is not None:
                            progress(1)
                        continue
                    pending[ordinal] = conv
                    yield Item(str(ordinal), "image", "", where, path=str(conv.image_path))

            batcher = ShapeBatcher(self.vt, self.vt.batch_size, 64, emit) if self.vt is not None else None
            for item, prep in pool.map(image_items(), self.spec):
                ordinal = int(item.key)
                if prep.reason:
                    (skips.filtered if prep.filtered else skips.bad)(prep.reason, item.where,
                                                                     f"image {item.path}: {prep.message}")
                    pending.pop(ordinal)
                    order.put(ordinal, [])
                else:
                    batcher.add(ordinal, item, prep.pixels)
                if progress is not None:
                    progress(1)
            if batcher is not None:
                batcher.flush()
            if order.ready or pending:
                raise RuntimeError(f"{piece.name}: conversations {sorted(order.ready)[:3]} were never "
                                   "written")
            stats = writer.finish({"conversations": piece.stop - piece.start, "images": counts["images"],
                                   "skipped": dict(sorted(skips.counts.items())),
                                   "skipped_items": skips.items})
        self.skips.merge(skips)
        self.counts.update(counts)
        self.counts.update(documents=stats["documents"], tokens=stats["tokens"], inputs=1,
                           conversations=piece.stop - piece.start)
        return stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.data_pipelines.tokenize_chat",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenize LLaVA-format conversations (JSON / JSON lines) into Emu3-Chat documents "
                    "with answer-only loss_spans, in token shards.",
        epilog="example:\n  python -m emu3_train.data_pipelines.tokenize_chat "
               "--input llava_v1_5_mix665k.json --image-folder /data/llava "
               "--vq /models/Emu3-VisionTokenizer-hf --out data/chat",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATTERN_OR_DIR",
                        help=".json (a list) / .jsonl files: paths, brace patterns, globs or directories")
    parser.add_argument("--image-folder", type=Path, default=None,
                        help="where the conversations' image paths are relative to (default: as given)")
    parser.add_argument("--vq", type=Path, default=None, metavar="PATH",
                        help="directory of a saved Emu3VQVAE (+ preprocessor_config.json); needed for images")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output shard directory")
    parser.add_argument("--items-per-shard", type=int, default=10_000,
                        help="conversations per input piece / output shard set (default 10000)")
    parser.add_argument("--max-shard-docs", type=int, default=DEFAULT_MAX_COUNT,
                        help=f"documents per output tar (default {DEFAULT_MAX_COUNT})")
    parser.add_argument("--min-pixels", type=int, default=UNDERSTANDING_MIN_PIXELS,
                        help="smaller images are resized up to this area (default 512*512)")
    parser.add_argument("--max-pixels", type=int, default=UNDERSTANDING_MAX_PIXELS,
                        help="larger images are resized down to this area (default 1024*1024)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per VQ call")
    parser.add_argument("--workers", type=int, default=2, help="decode processes (0: decode in this process)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda:LOCAL_RANK if present, else cpu), cpu, ...")
    add_worker_args(parser, "bad conversations")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a .tiktoken file for the text")
    parser.add_argument("--vocab", default="emu3", choices=sorted(PRESETS),
                        help="vocabulary preset (default emu3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.items_per_shard < 1 or args.batch_size < 1 or args.workers < 0:
        parser.error("--items-per-shard and --batch-size must be >= 1, --workers >= 0")
    worker = worker_identity(args.rank, args.world_size)
    all_pieces = pieces(expand_inputs(args.input, [".json", ".jsonl"]), args.items_per_shard)
    mine = my_share(all_pieces, worker)
    todo = [p for p in mine if not is_done(args.out, p.name)]
    if not todo:
        print(f"{worker}: all {len(mine)} of its {len(all_pieces)} input pieces are done in {args.out}")
        return 0
    from tqdm import tqdm

    vocab = get_vocab(args.vocab)
    from emu3_train.vq import ResizeSpec, VisionTokenizer

    vt = None
    spec = DecodeSpec(ResizeSpec(min_pixels=args.min_pixels, max_pixels=args.max_pixels))
    if args.vq is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        vt = VisionTokenizer(args.vq, local_device(args.device), args.min_pixels, args.max_pixels,
                             args.batch_size)
        spec = DecodeSpec(vt.spec)
    tok = ChatTokenizer(vt, vocab, load_tokenizer(vocab, args.tokenizer), spec, args.out, args.image_folder,
                        args.on_error, args.max_shard_docs)
    start = time.perf_counter()
    bar = tqdm(total=sum(p.stop - p.start for p in todo), desc=f"{worker}", unit="conv", file=sys.stderr)
    try:
        with DecodePool(args.workers if vt is not None else 0) as pool:
            for piece in todo:
                if vt is None:  # fail before writing anything when images appear without a VQ
                    _check_text_only(tok._file_records(piece.path), piece, args.image_folder)
                tok.run_piece(piece, pool, bar.update)
    finally:
        bar.close()
    seconds = max(time.perf_counter() - start, 1e-9)
    c = tok.counts
    extra = f"; {len(mine) - len(todo)} input pieces were already done" if len(mine) > len(todo) else ""
    print(f"{worker}: wrote {c['documents']} documents ({c['tokens']} tokens, {c['images']} images) from "
          f"{c['conversations']} conversations in {seconds:.1f} s "
          f"({c['conversations'] / seconds:.1f} conv/s) to {args.out} ({c['inputs']} input pieces); "
          f"{tok.skips.summary()}{extra}")
    return 0


def _check_text_only(records: list, piece: Piece, image_folder) -> None:
    for index in range(piece.start, piece.stop):
        rec = records[index]
        if isinstance(rec, dict) and rec.get("image"):
            raise ValueError(f"{piece.path}:{index}: the conversation has an image; pass --vq PATH "
                             "(an Emu3VQVAE folder) to tokenize images")


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with bad input reported as one ``error:`` line (exit code 2)."""
    return run_cli(main, argv)


__all__ = ["IMAGE_PLACEHOLDER", "SYSTEM", "ChatTokenizer", "Turn", "cli", "main", "pieces"]

if __name__ == "__main__":
    sys.exit(cli())
