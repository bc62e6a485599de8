"""What ``tokenize_images`` reads: input shards (webdataset tars, or a folder cut into fixed-size
pieces) and their items (an image, a video file, or a folder of frames) with captions.

**Tars** in img2dataset's layout (``--input 'shards/{00000..00099}.tar'`` or a directory of
tars): members ``KEY.jpg|jpeg|png|webp|...`` or ``KEY.mp4|webm|mkv|mov|avi`` next to ``KEY.txt``
and/or ``KEY.json``; the members of one sample are consecutive, as webdataset and img2dataset
write them. The caption is the first of ``caption_keys`` the sample has: ``txt`` (the
``KEY.txt`` member), ``json:FIELD`` (a field of ``KEY.json``, dotted for nesting:
``json:meta.caption``) or any other extension. Each tar is one input shard named after the file.

**Folders** (``--images DIR``): image files and video files directly in DIR, and sub-folders of
DIR, each a clip whose image files, sorted by name, are its frames. Captions come from
``--captions FILE.jsonl`` (lines ``{"image": "<name relative to DIR>", "caption": "..."}``) or a
sidecar ``DIR/<stem>.txt`` (``DIR/<clip>.txt`` for a frame folder). The sorted items are cut into
input shards of ``items_per_shard`` named ``<DIR name>_00000``, ``_00001``, ...

Bad input is counted (``work.Skips``), never fatal under ``--on-error skip``:
``truncated_input`` (a tar that ends early or whose headers are damaged: the complete samples
before the damage are kept), ``no_caption``, ``empty_caption``, ``no_image`` (a sample with no
image or video member), ``duplicate_key``, ``empty_clip`` (a sub-folder without images).

    shards = tar_shards("shards/{00000..00009}.tar")
    for item in iter_items(shards[0], ["txt", "json:caption"], skips): ...
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .video import VIDEO_SUFFIXES
from .work import Skips, expand_inputs, input_name

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_CAPTION_KEYS = ("txt", "json:caption")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key / extension split
_TAR_TAIL = 1 << 15  # a complete tar ends with >= 1,024 zero bytes (record padding: < 10,240 more)


@dataclass
class Item:
    """One image, video file or frame folder with its caption; picklable (sent to decode processes).

    ``kind``: ``image``, ``video`` or ``frames``. The bytes are in ``data`` (a tar member) or at
    ``path`` (a file); a frame folder lists its files in ``frames``. ``where``: input and key, for
    messages (``shards/00003.tar:000000042``).
    """

    key: str
    kind: str
    caption: str
    where: str
    data: bytes | None = None
    path: str | None = None
    frames: tuple[str, ...] = ()


@dataclass(frozen=True)
class FolderEntry:
    name: str  # relative to the folder (POSIX)
    kind: str  # image, video or frames
    paths: tuple[str, ...]


@dataclass(frozen=True)
class InputShard:
    """One unit of work with its own output shard set: a tar, or a slice of a folder's items."""

    name: str
    path: str
    entries: tuple[FolderEntry, ...] = ()  # a folder slice's items
    captions: dict = field(default_factory=dict, compare=False, hash=False)  # folder: name -> caption

    @property
    def is_tar(self) -> bool:
        return not self.entries


def tar_shards(spec: str | os.PathLike | Sequence) -> list[InputShard]:
    """The input tars of ``spec`` (directory, brace pattern, glob, file or list), sorted."""
    return [InputShard(input_name(p), str(p)) for p in expand_inputs(spec, [".tar"])]


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def scan_folder(root: str | os.PathLike) -> list[FolderEntry]:
    """The images, video files (directly in ``root``) and frame folders (its sub-folders), by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory not found: {root}")
    entries = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            frames = tuple(str(f) for f in sorted(p.iterdir()) if f.is_file() and _kind(f) == "image")
            entries.append(FolderEntry(p.name, "frames", frames))
        elif p.is_file() and _kind(p):
            entries.append(FolderEntry(p.name, _kind(p), (str(p),)))
    if not entries:
        raise ValueError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}), videos "
                         f"({', '.join(sorted(VIDEO_SUFFIXES))}) or frame folders")
    return entries


def load_captions(root: str | os.PathLike, entries: Sequence[FolderEntry],
                  captions: str | os.PathLike | None = None) -> tuple[dict[str, str], int]:
    """``({entry name: caption}, lines naming no entry)`` from ``captions`` (JSON lines) and sidecar
    ``.txt`` files; entries without either are absent. A malformed captions file is a ``ValueError``
    naming the line (the user's file, not a data item)."""
    root = Path(root)
    names = {e.name for e in entries}
    given: dict[str, str] = {}
    unused = 0
    if captions is not None:
        path = Path(captions)
        if not path.is_file():
            raise FileNotFoundError(f"captions file not found: {path}")
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
                if not (isinstance(obj, dict) and isinstance(obj.get("image"), str)
                        and isinstance(obj.get("caption"), str)):
                    raise ValueError(f"{path}:{line_no}: expected {{\"image\": str, \"caption\": str}}")
                if obj["image"] in given:
                    raise ValueError(f"{path}:{line_no}: a second caption for {obj['image']!r}")
                given[obj["image"]] = obj["caption"]
                unused += obj["image"] not in names
    out = {}
    for e in entries:
        if e.name in given:
            out[e.name] = given[e.name]
            continue
        sidecar = root / ((e.name if e.kind == "frames" else Path(e.name).stem) + ".txt")
        if sidecar.is_file():
            out[e.name] = sidecar.read_text(encoding="utf-8")
    return out, unused


def folder_shards(root: str | os.PathLike, items_per_shard: int,
                  captions: str | os.PathLike | None = None) -> tuple[list[InputShard], int]:
    """``(shards, caption lines naming no item)``: the folder's sorted items cut into input shards
    of ``items_per_shard``, named ``<folder name>_00000``, ... (deterministic: any worker computes
    the same list)."""
    if items_per_shard < 1:
        raise ValueError(f"items_per_shard must be >= 1, got {items_per_shard}")
    root = Path(root)
    entries = scan_folder(root)
    texts, unused = load_captions(root, entries, captions)
    base = input_name(root.resolve().name or "images")
    shards = []
    for i in range(0, len(entries), items_per_shard):
        part = tuple(entries[i:i + items_per_shard])
        shards.append(InputShard(f"{base}_{i // items_per_shard:05d}", str(root), part,
                                 {e.name: texts[e.name] for e in part if e.name in texts}))
    return shards, unused


def _caption_of(members: dict[str, bytes], caption_keys: Sequence[str]) -> tuple[str | None, str]:
    """``(caption, problem)``: the first caption key the sample has, or None and why not."""
    for spec in caption_keys:
        ext, _, fld = spec.partition(":")
        if ext not in members:
            continue
        try:
            text = members[ext].decode("utf-8")
        except UnicodeDecodeError:
            return None, f"its .{ext} is not UTF-8"
        if not fld:
            return text, ""
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            return None, f"its .{ext} is not valid JSON ({e})"
        for part in fld.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        if not isinstance(value, str):
            return None, f"field {fld!r} of its .{ext} is {type(value).__name__}, not text"
        return value, ""
    return None, f"none of {', '.join(caption_keys)} (members: {', '.join(sorted(members))})"


def read_tar(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of each sample of a tar, streamed in order.

    Raises ``tarfile.ReadError`` naming where the damage starts once the samples before it have
    been yielded: a cut or garbled member, or a tar that does not end with its end-of-archive
    blocks (truncated at a member boundary). The sample in progress at the damage is not yielded.
    """
    path = Path(path)
    key, group, last = None, {}, "the start"
    with open(path, "rb") as f:
        try:
            tf = tarfile.open(fileobj=f, mode="r|")
            for member in tf:
                m = _KEY_EXT.match(member.name)
                if not member.isfile() or m is None or Path(member.name).name.startswith("."):
                    continue
                if m[1] != key:  # a new sample begins: the one before is complete
                    if group:
                        yield key, group
                        last = f"sample {key}"
                    key, group = m[1], {}
                group[m[2].lower()] = tf.extractfile(member).read()
            end = tf.offset
        except (tarfile.TarError, EOFError, OSError) as e:
            raise tarfile.ReadError(f"damaged after {last} ({e})") from None
        f.seek(end)
        tail = f.read(_TAR_TAIL + 1)
        if len(tail) < 1024 or len(tail) > _TAR_TAIL or tail.count(0) != len(tail):
            where = f"after {last}" if not group else f"at sample {key}"
            raise tarfile.ReadError(f"ends early or has a damaged header {where} (no end-of-archive "
                                    f"blocks at byte {end})")
    if group:
        yield key, group


def _tar_items(shard: InputShard, caption_keys: Sequence[str], skips: Skips) -> Iterator[Item]:
    seen: set[str] = set()
    samples = read_tar(shard.path)
    while True:
        try:
            key, members = next(samples)
        except StopIteration:
            return
        except tarfile.ReadError as e:
            skips.bad("truncated_input", shard.path, str(e))
            return
        where = f"{shard.path}:{key}"
        if key in seen:
            skips.bad("duplicate_key", where, "a second sample with this key (members not consecutive?)")
            continue
        seen.add(key)
        media = [ext for ext in members if "." + ext in IMAGE_SUFFIXES] or \
                [ext for ext in members if "." + ext in VIDEO_SUFFIXES]
        if not media:
            skips.bad("no_image", where, f"no image or video member (members: {', '.join(sorted(members))})")
            continue
        caption, problem = _caption_of(members, caption_keys)
        if caption is None:
            skips.bad("no_caption", where, problem)
        elif not caption.strip():
            skips.bad("empty_caption", where, "its caption is empty")
        else:
            kind = "image" if "." + media[0] in IMAGE_SUFFIXES else "video"
            yield Item(key, kind, caption.strip(), where, data=members[media[0]])


def _folder_items(shard: InputShard, skips: Skips) -> Iterator[Item]:
    for e in shard.entries:
        where = str(Path(shard.path) / e.name)
        caption = shard.captions.get(e.name)
        if e.kind == "frames" and not e.paths:
            skips.bad("empty_clip", where, "clip folder holds no image files")
        elif caption is None:
            sidecar = (e.name if e.kind == "frames" else Path(e.name).stem) + ".txt"
            skips.bad("no_caption", where, f"no caption (not in the captions file and no sidecar {sidecar})")
        elif not caption.strip():
            skips.bad("empty_caption", where, "its caption is empty")
        elif e.kind == "frames":
            yield Item(e.name, "frames", caption.strip(), where, frames=e.paths)
        else:
            yield Item(e.name, e.kind, caption.strip(), where, path=e.paths[0])


def iter_items(shard: InputShard, caption_keys: Sequence[str], skips: Skips) -> Iterator[Item]:
    """The captioned items of one input shard in input order; bad ones go to ``skips``."""
    if shard.is_tar:
        return _tar_items(shard, caption_keys, skips)
    return _folder_items(shard, skips)
