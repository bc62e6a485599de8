"""Data ingestion: images/s of tokenize_images with 2 workers vs 1, bytes on disk per token of the
direct shards vs the old JSON-lines route, text tokens/s of tokenize_text per process.

Images: scikit-image's photos at full size (astronaut, coffee, chelsea, rocket, camera, cat,
hubble, retina, immunohistochemistry, logo RGBA; JPEG and PNG), repeated into 4 img2dataset-style
tars, tokenized by a tiny random Emu3VQVAE (the real one needs a GPU to be timed meaningfully)
resized to at most ``--max-pixels``. Each configuration runs the real CLI as separate processes
(``OMP_NUM_THREADS=1``, ``--device cpu``): 1 worker; 1 worker with a background decode process;
2 workers (``--rank 0/1 --world-size 2``) at once. images/s counts the loop each worker reports
(after loading the VQ), the slowest worker for 2; the wall time with start-up is printed too.
The 2-worker output is checked byte for byte against the 1-worker output.

Bytes per token: the direct shards (``.tar`` + ``.idx``) against the JSON lines the old tool
wrote first (``{"task", "source", "tokens": [...]}`` per line, the same documents), which
``write_shards`` then converted into the same shards (so that route needs both on disk).

Text: ``tokenize_text`` in this process on JSON lines of the standard library's source files.

    python benchmarks/ingest.py                  # ~1-2 min on 2 cores
    python benchmarks/ingest.py --images 80 --text-mb 4

Ends with one JSON line: {"images_per_s_1_worker", "images_per_s_2_workers", "ratio_2_vs_1", ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "hubble_deep_field", "retina",
          "immunohistochemistry", "logo")
SUMMARY = re.compile(r"from (\d+) images and \d+ clips in ([\d.]+) s")


def write_inputs(root: Path, n_images: int, n_tars: int = 4) -> None:
    """``root/vq`` (tiny random Emu3VQVAE) and ``root/in/0000k.tar`` of ``n_images`` photos."""
    import torch
    from PIL import Image
    from skimage import data
    from transformers import Emu3ImageProcessor, Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(0)
    config = Emu3VQVAEConfig(codebook_size=1024, embed_dim=4, latent_channels=4, base_channels=32,
                             channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                             hidden_size=32, temporal_downsample_factor=4)
    Emu3VQVAE(config).save_pretrained(root / "vq")
    Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(root / "vq")
    files = []
    for name in PHOTOS:
        im = Image.fromarray(getattr(data, name)())
        buf = io.BytesIO()
        fmt = "PNG" if im.mode == "RGBA" or name == "camera" else "JPEG"
        im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        files.append((buf.getvalue(), fmt.lower().replace("jpeg", "jpg"), name))
    (root / "in").mkdir()
    per_tar = -(-n_images // n_tars)
    for t in range(n_tars):
        with tarfile.open(root / "in" / f"{t:05d}.tar", "w") as tf:
            for i in range(t * per_tar, min(n_images, (t + 1) * per_tar)):
                payload, ext, name = files[i % len(files)]
                caption = f"photo {i} of {name.replace('_', ' ')}".encode()
                for suffix, blob in ((ext, payload), ("txt", caption)):
                    info = tarfile.TarInfo(f"{i:09d}.{suffix}")
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))


def run_workers(root: Path, out: str, world: int, decode_workers: int, max_pixels: int) -> dict:
    """Start ``world`` tokenize_images workers at once; their images, loop seconds and wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TIKTOKEN_CACHE_DIR": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_ARRAY_TASK_COUNT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "emu3_train.data_pipelines.tokenize_images", "--input", str(root / "in"),
           "--vq", str(root / "vq"), "--out", str(root / out), "--device", "cpu",
           "--max-pixels", str(max_pixels),
           "--min-pixels", str(min(max_pixels, 32 * 32)), "--workers", str(decode_workers)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "--rank", str(r), "--world-size", str(world)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for r in range(world)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker failed: {outs}")
    found = [SUMMARY.search(o) for o in outs]
    images = sum(int(m[1]) for m in found)
    loop = max(float(m[2]) for m in found)
    return {"images": images, "loop_s": loop, "wall_s": wall, "images_per_s": images / loop}


def same_output(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.tar"))
    return names == sorted(p.name for p in b.glob("*.tar")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def bytes_per_token(out: Path) -> tuple[float, float, float, int]:
    """(direct shards, JSON lines alone, JSON lines + shards) bytes per token of the shard set(s) in
    ``out``, and their tokens; the JSON lines are what the old tool wrote for the same documents."""
    from emu3_train.data.format import decode_meta, decode_tokens

    shard_bytes = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".tar", ".idx"))
    tokens, jsonl = 0, 0
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            parts: dict = {}
            for m in tf.getmembers():
                key, _, suffix = m.name.partition(".")
                parts.setdefault(key, {})[suffix] = tf.extractfile(m).read()
        for p in parts.values():
            ids = decode_tokens(p["tokens.npy"]).tolist()
            meta = decode_meta(p["json"])
            line = json.dumps({"task": meta["task"], "source": meta["source"], "tokens": ids}) + "\n"
            jsonl += len(line.encode())
            tokens += len(ids)
    return shard_bytes / tokens, jsonl / tokens, (jsonl + shard_bytes) / tokens, tokens


def emu3_size_shards(out: Path, pairs: int = 100) -> Path:
    """t2i/i2t documents of Emu3's smallest resize (512x512 pixels -> 64x64 codes, 4,160 + caption
    tokens; random codes, real captions) written by the tool's own ShardSetWriter."""
    from emu3_train.data_pipelines.shard_output import ShardSetWriter
    from emu3_train.layout import i2t_document, t2i_document
    from emu3_train.tokenizer import load_tokenizer
    from emu3_train.vocab import get_vocab

    vocab = get_vocab("emu3")
    encode = load_tokenizer(vocab).encode
    rng = np.random.default_rng(0)
    writer = ShardSetWriter(out, "emu3size", vocab)
    for i in range(pairs):
        caption = encode(f"photo {i}: a cat sitting on a wooden chair next to a window, afternoon light")
        codes = rng.integers(0, vocab.codebook_size, (64, 64))
        for task, make in (("t2i", t2i_document), ("i2t", i2t_document)):
            writer.add(make(vocab, caption, codes, encode), {"task": task, "source": f"emu3size/{i}"},
                       key=f"{i:09d}-{task}")
    writer.finish()
    return out


def text_tokens_per_s(root: Path, megabytes: float) -> tuple[float, int]:
    """tokenize_text in this process over JSON lines of standard-library source text."""
    from emu3_train.data_pipelines import tokenize_text

    corpus = root / "text" / "stdlib.jsonl"
    corpus.parent.mkdir()
    size, budget = 0, int(megabytes * 2**20)
    with open(corpus, "w", encoding="utf-8") as f:
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace")
            f.write(json.dumps({"text": text}) + "\n")
            size += len(text.encode())
            if size >= budget:
                break
    printed = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        rc = tokenize_text.main(["--input", str(corpus), "--out", str(root / "text_out")])
    seconds = time.perf_counter() - t0
    if rc:
        raise RuntimeError(f"tokenize_text exit code {rc}")
    tokens = sum(json.loads(p.read_text())["tokens"] for p in (root / "text_out").glob("*.stats.json"))
    rate = re.search(r"\(([\d,]+) tokens/s\)", printed.getvalue())  # its own rate: tokenizer loaded
    return (float(rate[1].replace(",", "")) if rate else tokens / seconds), tokens, tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=160, help="images over 4 input tars")
    parser.add_argument("--max-pixels", type=int, default=128 * 128, help="resize ceiling of the tiny VQ")
    parser.add_argument("--text-mb", type=float, default=8.0, help="megabytes of text for tokenize_text")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_inputs(root, args.images)
        one = run_workers(root, "one", 1, 0, args.max_pixels)
        pooled = run_workers(root, "pooled", 1, 1, args.max_pixels)
        two = run_workers(root, "two", 2, 0, args.max_pixels)
        identical = same_output(root / "one", root / "two") and same_output(root / "one", root / "pooled")
        direct, jsonl, route, tokens = bytes_per_token(root / "one")
        big = bytes_per_token(emu3_size_shards(root / "emu3size"))
        text_rate, text_tokens, text_wall_rate = text_tokens_per_s(root, args.text_mb)
    load = os.getloadavg()[0]
    ratio = two["images_per_s"] / one["images_per_s"]
    for name, r in (("1 worker", one), ("1 worker + 1 decode process", pooled), ("2 workers", two)):
        print(f"tokenize_images, {name}: {r['images']} images in {r['loop_s']:.1f} s of loop "
              f"({r['images_per_s']:.1f} images/s), {r['wall_s']:.1f} s wall with start-up")
    print(f"2 workers vs 1: x{ratio:.2f} images/s; outputs identical byte for byte: {identical}")
    for what, (d, j, r, n) in ((f"this run's documents (grids of <= {args.max_pixels} pixels / 64)",
                                (direct, jsonl, route, tokens)), ("Emu3-size documents (64x64 codes)", big)):
        print(f"bytes on disk per token, {what}, {n} tokens: direct shards {d:.2f}; JSON-lines route "
              f"{j:.2f} for the JSON lines alone, {r:.2f} with the shards made from them (x{r / d:.1f})")
    print(f"tokenize_text: {text_tokens} tokens at {text_rate / 1e6:.2f}M tokens/s in one process "
          f"({text_wall_rate / 1e6:.2f}M tokens/s counting the tokenizer's load)")
    print(f"load average during the run: {load:.1f} on {os.cpu_count()} CPUs (other jobs slow every row)")
    print(json.dumps({"images_per_s_1_worker": round(one["images_per_s"], 2),
                      "images_per_s_1_worker_decode_process": round(pooled["images_per_s"], 2),
                      "images_per_s_2_workers": round(two["images_per_s"], 2),
                      "ratio_2_vs_1": round(ratio, 2),
                      "outputs_identical": identical, "bytes_per_token_shards": round(direct, 3),
                      "bytes_per_token_jsonl": round(jsonl, 3),
                      "bytes_per_token_jsonl_route": round(route, 3),
                      "emu3_size_bytes_per_token_shards": round(big[0], 3),
                      "emu3_size_bytes_per_token_jsonl": round(big[1], 3),
                      "emu3_size_bytes_per_token_jsonl_route": round(big[2], 3),
                      "load_average": round(load, 1),
                      "text_tokens_per_s": round(text_rate), "max_pixels": args.max_pixels,
                      "images": args.images}))


if __name__ == "__main__":
    main()
