"""Tokenize captioned images and videos into t2i / i2t / video documents, straight into token shards.

    # webdataset tars in img2dataset's layout (KEY.jpg + KEY.txt / KEY.json), one worker
    python -m emu3_train.data_pipelines.tokenize_images --input 'laion/{00000..00099}.tar' \\
        --vq /models/Emu3-VisionTokenizer-hf --out data/laion --caption-key txt,json:caption
    # a folder of images, video files and sub-folders of frames, captions in a JSON-lines file
    python -m emu3_train.data_pipelines.tokenize_images --images photos/ --captions captions.jsonl \\
        --vq /models/Emu3-VisionTokenizer-hf --out data/photos
    # one node, one worker per GPU
    torchrun --nproc-per-node 8 -m emu3_train.data_pipelines.tokenize_images \\
        --input 'laion/{00000..00999}.tar' --vq /models/Emu3-VisionTokenizer-hf --out data/laion

Inputs (``data_pipelines.image_inputs``): each tar is one input shard; a folder's sorted items are
cut into input shards of ``--items-per-shard``. Output (``data_pipelines.shard_output``): for
each input shard ``NAME``, ``OUT/NAME-000000.tar`` + ``.idx`` (...) and ``OUT/NAME.stats.json``,
published when the input is complete; a rerun skips inputs whose stats file exists, so any number
of workers can run, die and rerun. Worker ``i`` of ``N`` (``--rank/--world-size``, else torchrun's
or slurm's environment) takes input shards ``i, i+N, ...``; its VQ runs on ``cuda:LOCAL_RANK``.

Documents (keys ``<key>-t2i``, ``<key>-i2t``, ``<key>-clipNN``; ``source`` = ``<input name>/<key>``),
written in input order whatever the batching:

- per image, one per ``--tasks`` entry: ``t2i`` (caption, then the image), ``i2t`` (image, then caption);
- per video file, one ``video`` document per clip of at most ``--max-frames`` frames at ``--fps``
  (``data_pipelines.video``), its vision block's meta ``"t*h*w {fps}fps {duration}s"``;
- per frame folder, one ``video`` document (frames padded to a multiple of 4 with the last one;
  image meta ``h*w``: a folder of frames has no frame rate).

Pixels to codes (``emu3_train.vq``): background processes (``--workers``) decode, convert to RGB
(``data_pipelines.decode_pool``: alpha on white, CMYK, 16-bit scaled), filter and resize to
Emu3's processor shape; the main process runs the VQ-VAE in batches of ``--batch-size`` images of
one resized shape, collected over a window of ``--batch-window`` pending images. Bad items
(undecodable, no or empty caption, truncated tar, ...) are skipped and counted by reason with the
input and key named (``--on-error error``: stop at the first with one line); the summary line and
each ``NAME.stats.json`` list the counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from emu3_train.layout import i2t_document, t2i_document, vision_block
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import PRESETS, Vocab, get_vocab
from emu3_train.vq import VisionTokenizer

from ._cli import run_cli
from .decode_pool import DecodePool, DecodeSpec, Prepared
from .image_inputs import DEFAULT_CAPTION_KEYS, InputShard, Item, folder_shards, iter_items, tar_shards
from .shard_output import DEFAULT_MAX_COUNT, ShardSetWriter, is_done
from .video import check_clip_args
from .work import Skips, add_worker_args, local_device, my_share, worker_identity

IMAGE_TASKS = ("t2i", "i2t")


class InOrder:
    """Hands each ordinal's documents to ``write`` in ordinal order, whatever order they finish in."""

    def __init__(self, write: Callable[[list], None]):
        self.write, self.next, self.ready = write, 0, {}

    def put(self, ordinal: int, docs: list) -> None:
        self.ready[ordinal] = docs
        while self.next in self.ready:
            self.write(self.ready.pop(self.next))
            self.next += 1


class ShapeBatcher:
    """Images grouped by resized shape; a group is encoded when it holds ``batch_size`` images, or,
    when more than ``window`` images wait, the group holding the oldest one is encoded as it is."""

    def __init__(self, vt: VisionTokenizer, batch_size: int, window: int, emit: Callable):
        self.vt, self.batch_size, self.window, self.emit = vt, batch_size, max(window, batch_size), emit
        self.groups: dict[tuple[int, int], list] = {}
        self.waiting = 0

    def add(self, ordinal: int, item: Item, pixels: np.ndarray) -> None:
        group = self.groups.setdefault(pixels.shape[:2], [])
        group.append((ordinal, item, pixels))
        self.waiting += 1
        if len(group) >= self.batch_size:
            self._encode(pixels.shape[:2])
        while self.waiting > self.window:
            self._encode(min(self.groups, key=lambda s: self.groups[s][0][0]))

    def _encode(self, shape) -> None:
        group = self.groups.pop(shape)
        self.waiting -= len(group)
        codes = self.vt.encode_pixels(self.vt.pixels(np.stack([p for *_, p in group])))
        for (ordinal, item, _), grid in zip(group, codes):
            self.emit(ordinal, item, grid)

    def flush(self) -> None:
        while self.groups:
            self._encode(min(self.groups, key=lambda s: self.groups[s][0][0]))


class ImageTokenizer:
    """Everything one worker needs to turn input shards into shard sets (the loop of :meth:`run_shard`)."""

    def __init__(self, vt: VisionTokenizer, vocab: Vocab, tokenizer, spec: DecodeSpec, out_dir: Path,
                 tasks=IMAGE_TASKS, on_error: str = "skip", caption_keys=DEFAULT_CAPTION_KEYS,
                 batch_window: int = 64, max_shard_docs: int = DEFAULT_MAX_COUNT):
        if vt.codebook_size > vocab.codebook_size:
            raise ValueError(f"the VQ-VAE has {vt.codebook_size} codes, vocabulary {vocab.name!r} only "
                             f"{vocab.codebook_size}")
        if spec.temporal != vt.temporal:
            raise ValueError(f"clips are cut for a temporal factor {spec.temporal}, the VQ-VAE has "
                             f"{vt.temporal}")
        self.vt, self.vocab, self.encode, self.spec = vt, vocab, tokenizer.encode, spec
        self.out_dir, self.tasks, self.on_error = Path(out_dir), tuple(tasks), on_error
        self.caption_keys, self.batch_window = tuple(caption_keys), batch_window
        self.max_shard_docs = max_shard_docs
        self.skips = Skips(on_error)
        self.counts: Counter = Counter()  # images, clips, documents, tokens, inputs, inputs_done_before

    def _image_docs(self, name: str, item: Item, grid: np.ndarray) -> list:
        caption = self.encode(item.caption)
        build = {"t2i": t2i_document, "i2t": i2t_document}
        return [(f"{item.key}-{task}", build[task](self.vocab, caption, grid, self.encode),
                 {"task": task, "source": f"{name}/{item.key}"}) for task in self.tasks]

    def _video_doc(self, name: str, item: Item, codes: np.ndarray, index: int, clip=None) -> tuple:
        timing = {} if clip is None else {"fps": clip.fps, "duration": clip.duration}
        tokens = [self.vocab.bos, *self.encode(item.caption),
                  *vision_block(self.vocab, codes, self.encode, **timing), self.vocab.eos]
        meta = {"task": "video", "source": f"{name}/{item.key}", "clip": index}
        if clip is not None:
            meta["start"] = round(clip.start, 6)
        return f"{item.key}-clip{index:02d}", tokens, meta

    def run_shard(self, shard: InputShard, pool: DecodePool,
                  progress: Callable[[int], None] | None = None) -> dict:
        """Tokenize one input shard into its shard set; returns its stats (``NAME.stats.json``)."""
        skips = Skips(self.on_error)
        counts: Counter = Counter()
        with ShardSetWriter(self.out_dir, shard.name, self.vocab, input_path=shard.path,
                            max_count=self.max_shard_docs) as writer:
            def write(docs):
                for key, tokens, meta in docs:
                    writer.add(tokens, meta, key=key)

            order = InOrder(write)

            def emit(ordinal, item, grid):
                counts["images"] += 1
                order.put(ordinal, self._image_docs(shard.name, item, grid))

            batcher = ShapeBatcher(self.vt, self.vt.batch_size, self.batch_window, emit)
            items = iter_items(shard, self.caption_keys, skips)
            for ordinal, (item, prep) in enumerate(pool.map(items, self.spec)):
                self._handle(shard, ordinal, item, prep, order, batcher, skips, counts)
                if progress is not None:
                    progress(1)
            batcher.flush()
            if order.ready:
                raise RuntimeError(f"{shard.name}: documents of items {sorted(order.ready)[:3]} were "
                                   "never written")
            stats = writer.finish({"images": counts["images"], "clips": counts["clips"],
                                   "tail_frames_dropped": counts["tail_frames_dropped"],
                                   "skipped": dict(sorted(skips.counts.items())),
                                   "skipped_items": skips.items})
        self.skips.merge(skips)
        self.counts.update(counts)
        self.counts.update(documents=stats["documents"], tokens=stats["tokens"], inputs=1)
        return stats

    def _handle(self, shard: InputShard, ordinal: int, item: Item, prep: Prepared, order: InOrder,
                batcher: ShapeBatcher, skips: Skips, counts: Counter) -> None:
        if prep.reason:
            (skips.filtered if prep.filtered else skips.bad)(prep.reason, item.where, prep.message)
            order.put(ordinal, [])
        elif item.kind == "image":
            batcher.add(ordinal, item, prep.pixels)
        elif item.kind == "frames":
            codes = self.vt.encode_clip_pixels(self.vt.pixels(prep.pixels))
            counts["clips"] += 1
            order.put(ordinal, [self._video_doc(shard.name, item, codes, 0)])
        else:
            docs = []
            for clip in prep.clips:
                codes = self.vt.encode_clip_pixels(self.vt.pixels(clip.pixels))
                docs.append(self._video_doc(shard.name, item, codes, clip.index, clip))
            counts["clips"] += len(docs)
            counts["tail_frames_dropped"] += prep.tail_frames_dropped
            order.put(ordinal, docs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.data_pipelines.tokenize_images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenize captioned images and videos (webdataset tars or a folder) into t2i / i2t / "
                    "video documents in token shards, with Emu3's image processor and VQ-VAE.",
        epilog="examples:\n  python -m emu3_train.data_pipelines.tokenize_images "
               "--input 'laion/{00000..00099}.tar' --vq /models/Emu3-VisionTokenizer-hf --out data/laion\n"
               "  python -m emu3_train.data_pipelines.tokenize_images --images photos/ "
               "--captions captions.jsonl --vq /models/Emu3-VisionTokenizer-hf --out data/photos",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, metavar="DIR",
                     help="a folder: image files, video files, and sub-folders of frames (one clip each)")
    src.add_argument("--input", nargs="+", metavar="PATTERN_OR_DIR",
                     help="webdataset tars (img2dataset layout): files, brace patterns, globs or directories")
    parser.add_argument("--captions", type=Path, default=None,
                        help='for --images: JSON lines {"image": NAME, "caption": TEXT} '
                             '(default: sidecar NAME.txt)')
    parser.add_argument("--caption-key", default=",".join(DEFAULT_CAPTION_KEYS),
                        help="for tars: where the caption is, first found wins: txt, json:FIELD, ... "
                             "(default txt,json:caption)")
    parser.add_argument("--vq", type=Path, required=True, metavar="PATH",
                        help="directory of a saved Emu3VQVAE (+ preprocessor_config.json)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output shard directory")
    parser.add_argument("--tasks", default="t2i,i2t", help="documents per image: t2i, i2t or both (default)")
    parser.add_argument("--items-per-shard", type=int, default=1000,
                        help="for --images: items per input shard (default 1000)")
    parser.add_argument("--max-shard-docs", type=int, default=DEFAULT_MAX_COUNT,
                        help=f"documents per output tar (default {DEFAULT_MAX_COUNT})")
    parser.add_argument("--min-pixels", type=int, default=None, help="resize floor (default: processor's)")
    parser.add_argument("--max-pixels", type=int, default=None, help="resize ceiling (default: processor's)")
    parser.add_argument("--min-side", type=int, default=0,
                        help="drop images whose shorter side is below this (pixels)")
    parser.add_argument("--max-aspect", type=float, default=None,
                        help="drop images whose long/short side ratio is above this "
                             "(Emu3's resize caps it at 200)")
    parser.add_argument("--fps", type=float, default=8.0,
                        help="video frames per second after resampling (default 8)")
    parser.add_argument("--max-frames", type=int, default=32,
                        help="frames per video clip, a multiple of the VQ's temporal factor 4 (default 32)")
    parser.add_argument("--min-duration", type=float, default=0.0, help="drop videos shorter than this (s)")
    parser.add_argument("--max-duration", type=float, default=None, help="drop videos longer than this (s)")
    parser.add_argument("--batch-size", type=int, default=8, help="images (or 4-frame chunks) per VQ call")
    parser.add_argument("--batch-window", type=int, default=64,
                        help="images waiting for a full same-shape batch before a partial one is encoded")
    parser.add_argument("--workers", type=int, default=2, help="decode processes (0: decode in this process)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda:LOCAL_RANK if present, else cpu), cpu, cuda:1, ...")
    add_worker_args(parser)
    parser.add_argument("--tokenizer", type=Path, default=None, help="a .tiktoken file for the captions")
    parser.add_argument("--vocab", default="emu3", choices=sorted(PRESETS),
                        help="vocabulary preset (default emu3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks or any(t not in IMAGE_TASKS for t in tasks):
        parser.error(f"--tasks {args.tasks!r}: give t2i, i2t or t2i,i2t")
    caption_keys = [k for k in args.caption_key.split(",") if k]
    if not caption_keys:
        parser.error("--caption-key: give at least one of txt, json:FIELD, ...")
    if args.batch_size < 1 or args.workers < 0:
        parser.error("--batch-size must be >= 1 and --workers >= 0")
    worker = worker_identity(args.rank, args.world_size)
    if args.images is not None:
        shards, unused = folder_shards(args.images, args.items_per_shard, args.captions)
    else:
        shards, unused = tar_shards(args.input), 0
    mine = my_share(shards, worker)
    todo = [s for s in mine if not is_done(args.out, s.name)]
    if not todo:
        print(f"{worker}: all {len(mine)} of its {len(shards)} input shards are done in {args.out}")
        return 0
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    vocab = get_vocab(args.vocab)
    vt = VisionTokenizer(args.vq, local_device(args.device), args.min_pixels, args.max_pixels,
                         args.batch_size)
    check_clip_args(args.fps, args.max_frames, vt.temporal)
    spec = DecodeSpec(vt.spec, args.min_side, args.max_aspect, args.fps, args.max_frames, vt.temporal,
                      args.min_duration, args.max_duration)
    tok = ImageTokenizer(vt, vocab, load_tokenizer(vocab, args.tokenizer), spec, args.out, tasks,
                         args.on_error, caption_keys, args.batch_window, args.max_shard_docs)
    start = time.perf_counter()
    total = sum(len(s.entries) for s in todo) if all(not s.is_tar for s in todo) else None
    bar = tqdm(total=total, desc=f"{worker} on {vt.device}", unit="item", file=sys.stderr)
    try:
        with DecodePool(args.workers) as pool:
            for shard in todo:
                tok.run_shard(shard, pool, bar.update)
    finally:
        bar.close()
    seconds = max(time.perf_counter() - start, 1e-9)
    c = tok.counts
    items = c["images"] + c["clips"]
    extra = f"; {len(mine) - len(todo)} input shards were already done" if len(mine) > len(todo) else ""
    extra += f"; {unused} captions name no item" if unused else ""
    print(f"{worker}: wrote {c['documents']} documents ({c['tokens']} tokens) from {c['images']} images and "
          f"{c['clips']} clips in {seconds:.1f} s ({items / seconds:.1f} items/s) to {args.out} "
          f"({c['inputs']} input shards); {tok.skips.summary()}{extra}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with bad input reported as one ``error:`` line (exit code 2)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
