"""Generate images, video and text with a trained model: ``python -m emu3_train.generate SOURCE ...``

SOURCE is a run directory (``runs/demo-stage1``), its ``ckpt``, ``ckpt/latest``, a ``ckpt/step_N``
(any dp/cp/tp layout) or a Hugging Face folder written by ``python -m emu3_train.interop.hf export``
(``emu3_train.model_source.load_model``). Examples on the demo checkpoint (``make pretrain-stage1``):

    python -m emu3_train.generate runs/demo-stage1 --prompt "a handwritten digit seven" --n 8 --cfg 3 \
        --out out/seven
    python -m emu3_train.generate runs/demo-stage1 --prompts prompts.txt --grid 8x8 --temperature 0.8
    python -m emu3_train.generate runs/demo-stage1 --image out/seven/item_0000.png --image b.png  # captions
    python -m emu3_train.generate runs/demo-stage1 --prompt "a digit" --video-frames 4 --out out/clip
    python -m emu3_train.generate runs/demo-stage1 --continue out/clip/codes.json --video-frames 2
    python -m emu3_train.generate hf/demo --text --prompt "a handwritten" --temperature 0
and on an Emu3 model with its VQ-VAE (``emu3_train/vq.py`` says how to save one):

    python -m emu3_train.generate /models/Emu3-Gen-hf --vq /models/Emu3-VisionTokenizer-hf --device cuda \\
        --prompt "a red fox in snow" --size 720x720 --cfg 3 --top-k 2048 --negative-prompt "lowres, blurry"
    python -m emu3_train.generate CKPT --vq VQ --continue clip.mp4 --continue-frames 2 --video-frames 4
    python -m emu3_train.generate /models/Emu3-Chat-hf --vq VQ --image cat.jpg --question "What is it?"

Grid: ``--grid HxW`` in codes, or ``--size WxH`` in pixels, mapped by the image processor's smart
resize (multiples of its factor, ``min_pixels <= H*W <= max_pixels``) and divided by the VQ's
spatial factor; without ``--vq`` the Emu3 VisionTokenizer defaults apply (factor 8, 512²..1024²
pixels). Default: 8x8 for the demo vocabulary, ``--size 720x720`` (90x90) for Emu3's.
Sampling: ``--temperature`` (0 = greedy; default 1 for vision, 0 for text), ``--top-k``, ``--top-p``,
``--cfg`` (classifier-free guidance scale, 1 = off) against ``--negative-prompt`` ("" = the empty
caption). Batch b (up to ``--batch-size`` items of one prompt) draws from seed ``--seed + b``.

Writes to ``--out``: ``grid.png`` (a row per prompt; VQ-decoded, or gray levels without a VQ),
``item_NNNN.png`` per image, ``item_NNNN.gif`` and ``.mp4`` per clip, and ``codes.json``
(``emu3_train/gen_outputs.py``). Bad input (a prompt plus grid longer than the model's positions, a
grid the VQ's processor never produces, a checkpoint of another shape, a negative ``--cfg``, an HF
folder that is not Emu3) is one line ``error: ...`` naming the value, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from emu3_train import gen_outputs as outputs
from emu3_train.generation import Sampling, frame_tokens, generate_text, generate_vision, image_prompt
from emu3_train.layout import vision_block
from emu3_train.vq import ResizeSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def parse_pair(text: str, flag: str) -> tuple[int, int]:
    """``"AxB"`` of the command-line ``flag`` -> (A, B), both >= 1; else a one-line ValueError."""
    try:
        a, b = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected two positive integers like 64x64") from None
    if a < 1 or b < 1:
        raise ValueError(f"{flag} {text!r}: both sides must be >= 1")
    return a, b


class Grid:
    """The code grid of the request: ``--grid HxW``, ``--size WxH`` pixels, a given clip's, or the default."""

    def __init__(self, args, vq, vocab):
        self.spec, self.spatial = (vq.spec, vq.spatial) if vq is not None else (ResizeSpec(), 8)
        self.vq, self.codebook = vq, vocab.codebook_size
        self.hw = self._resolve(args, vocab)

    def _from_size(self, size: str) -> tuple[int, int]:
        w, h = parse_pair(size, "--size")
        rh, rw = self.spec.resized_shape(h, w)
        if (rh, rw) != (h, w):
            print(f"--size {size}: the image processor resizes it to {rw}x{rh} pixels", file=sys.stderr)
        return rh // self.spatial, rw // self.spatial

    def _resolve(self, args, vocab) -> tuple[int, int]:
        if args.grid:
            hw = parse_pair(args.grid, "--grid")
            if args.size and self._from_size(args.size) != hw:
                raise ValueError(f"--grid {args.grid} and --size {args.size} ({self._from_size(args.size)} "
                                 "codes) disagree; give one of them")
            if self.vq is not None:
                px = (hw[0] * self.spatial, hw[1] * self.spatial)
                if self.spec.resized_shape(*px) != px:
                    raise ValueError(f"--grid {args.grid} is {px[1]}x{px[0]} pixels at the VQ's factor "
                                     f"{self.spatial}, a size its image processor never produces "
                                     f"({self.spec.min_pixels}..{self.spec.max_pixels} pixels, multiples of "
                                     f"{self.spec.factor}); use --size WxH")
            return hw
        if args.size:
            return self._from_size(args.size)
        return (8, 8) if vocab.name == "demo" else self._from_size("720x720")

    def check_codes(self, codes: np.ndarray, flag: str, given: bool) -> tuple[int, int]:
        """The grid of given codes [T, h, w]; it must equal --grid/--size when one was given."""
        hw = tuple(int(x) for x in codes.shape[1:])
        if given and hw != self.hw:
            raise ValueError(f"{flag}: its codes are a {hw[0]}x{hw[1]} grid, --grid/--size ask for "
                             f"{self.hw[0]}x{self.hw[1]}")
        return hw


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m emu3_train.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="run dir, ckpt, ckpt/latest, ckpt/step_N or HF folder")
    p.add_argument("--prompt", action="append", default=[], help="caption (repeatable)")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="captions, one a line (blank lines skipped)")
    p.add_argument("--negative-prompt", default="", help="unconditional prompt of --cfg (default: empty)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off; Emu3: 3)")
    p.add_argument("--size", metavar="WxH", help="image size in pixels (smart resize, then / the VQ factor)")
    p.add_argument("--grid", metavar="HxW", help="image size in codes, e.g. 64x64")
    p.add_argument("--n", type=int, default=1, help="items per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="items per forward (x2 with guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, help="0 = greedy (default: 1 for vision, 0 for text)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely codes/tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--vq", metavar="PATH", help="Emu3VQVAE folder: decode codes, encode --image/--continue")
    p.add_argument("--video-frames", type=int, default=1, help="code frames to generate (> 1: a clip)")
    p.add_argument("--fps", type=float, default=8.0, help="video frame rate for the meta and the GIF/MP4")
    p.add_argument("--continue", dest="clip", metavar="CLIP",
                   help="continue a clip: a video file (needs --vq), codes.json[:K] or codes .npy")
    p.add_argument("--continue-frames", type=int, help="code frames of CLIP given (default: all; video: 1)")
    p.add_argument("--image", metavar="FILE", action="append", default=[],
                   help="understanding: image (--vq; else a gray PNG) or codes; repeatable")
    p.add_argument("--question", default="", help="text after the image (default: none = caption it)")
    p.add_argument("--text", action="store_true", help="text continuation of each --prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="text answers (default 64)")
    p.add_argument("--vocab", choices=["demo", "emu3"], help="the vocabulary when SOURCE does not say")
    p.add_argument("--out", type=Path, default=Path("outputs/generate"), help="output folder")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda if available)")
    args = p.parse_args(argv)
    for name, ok, need in (("n", args.n >= 1, ">= 1"), ("batch_size", args.batch_size >= 1, ">= 1"),
                           ("video_frames", args.video_frames >= 1, ">= 1"), ("cfg", args.cfg >= 0, ">= 0"),
                           ("fps", args.fps > 0, "> 0"), ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
                           ("continue_frames", (args.continue_frames or 1) >= 1, ">= 1")):
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {need}")
    if args.clip and args.image:
        raise ValueError("--continue and --image are different tasks; give one")
    return args


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        if not args.prompts.is_file():
            raise ValueError(f"--prompts {args.prompts}: no such file")
        prompts += [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    return prompts


def _source_path(source: str) -> Path:
    """A run directory stands for its ``ckpt`` folder (whose ``latest`` load_model follows)."""
    path = Path(source)
    if (path / "ckpt").is_dir() and not (path / "config.json").is_file():
        return path / "ckpt"
    return path


def _progress(total: int, what: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc=what, file=sys.stderr, dynamic_ncols=True)


def _ticker(bar, items: int):
    """progress callback: one generated position of a batch of ``items`` is ``items`` tokens."""
    return lambda k: bar.update(k * items)


def _check_length(model, prompt_len: int, new: int, what: str) -> None:
    limit = model.model.max_positions
    if prompt_len + new > limit:
        raise ValueError(f"{what}: a {prompt_len}-token prompt plus {new} generated positions is "
                         f"{prompt_len + new}, more than the model's max_position_embeddings={limit}")


def _batches(prompts: list[str], n: int, size: int):
    """(prompt index, item indices) chunks: up to ``size`` items of one prompt each."""
    for p in range(len(prompts)):
        for start in range(0, n, size):
            yield p, list(range(start, min(n, start + size)))


def _clip_codes(args, vq, grid: Grid, temporal: int, image: str | None = None) -> np.ndarray:
    """Codes [T0, h, w] of --continue (or of ``image``, one --image): a codes file, a video file or an
    image file."""
    spec, given = args.clip or image, bool(args.grid or args.size)
    name = Path(spec.split(".json:")[0] + (".json" if ".json:" in spec else ""))
    if name.suffix in (".json", ".npy"):
        codes = outputs.read_codes(spec)
    elif image:
        from PIL import Image

        if not name.is_file():
            raise ValueError(f"--image {spec}: no such file")
        picture = Image.open(name).convert("RGB")
        if vq is None:
            codes = outputs.gray_codes(np.asarray(picture), grid.codebook)[None]
        else:
            if given:  # the asked pixel size, which the processor keeps as it is
                picture = picture.resize((grid.hw[1] * vq.spatial, grid.hw[0] * vq.spatial), resample=3)
            codes = vq.encode_images([picture])[0][None]
    else:
        from emu3_train.data_pipelines.video import read_clips

        if vq is None:
            raise ValueError(f"--continue {spec}: a video file needs --vq to encode it (or pass codes.json)")
        k = args.continue_frames or 1
        size = (grid.hw[0] * vq.spatial, grid.hw[1] * vq.spatial) if given else None
        clips = read_clips(spec, fps=args.fps, max_frames=k * temporal, temporal=temporal, size=size)
        codes = vq.encode_video(list(clips[0].frames))
    if args.continue_frames:
        if args.continue_frames > len(codes):
            raise ValueError(f"--continue-frames {args.continue_frames}: {spec} holds {len(codes)} "
                             "code frames")
        codes = codes[:args.continue_frames]
    if codes.min() < 0 or codes.max() >= grid.codebook:
        raise ValueError(f"{spec}: codes in [{codes.min()}, {codes.max()}], the vocabulary's codebook has "
                         f"{grid.codebook}")
    grid.check_codes(codes, "--continue" if args.clip else "--image", given)
    return codes


def _vision(args, src, vocab, tok, vq, grid: Grid, device) -> list[dict]:
    temporal = vq.temporal if vq is not None else 4
    prefix = _clip_codes(args, vq, grid, temporal) if args.clip else None
    h, w = prefix.shape[1:] if prefix is not None else grid.hw
    given = 0 if prefix is None else len(prefix)
    frames, video = args.video_frames, args.video_frames > 1 or prefix is not None
    meta = {}
    if video:  # the meta of the whole clip, given frames included, as tokenize_images writes it
        meta = dict(frames=given + frames, fps=args.fps, duration=(given + frames) * temporal / args.fps)
    prompts = _prompts(args) or ([""] if prefix is not None else [])
    if not prompts:
        raise ValueError("nothing to generate: give --prompt, --prompts, --continue, --image or --text")
    temperature = 1.0 if args.temperature is None else args.temperature
    sampling = Sampling(temperature, args.top_k, args.top_p, args.cfg)
    positions = frames * (h * (w + 1) + 1) - 1
    pre = len(frame_tokens(vocab, prefix, tok.encode)) if prefix is not None else 0
    for text in prompts + ([args.negative_prompt] if sampling.guided else []):
        n_prompt = len(image_prompt(vocab, tok.encode, text, h, w, **meta)) + pre
        _check_length(src.model, n_prompt, positions, f"--grid {h}x{w} x {frames} frames after {text!r}")
    items, bar = [], _progress(positions * len(prompts) * args.n, "codes")
    for b, (p, idx) in enumerate(_batches(prompts, args.n, args.batch_size)):
        pos = [image_prompt(vocab, tok.encode, prompts[p], h, w, **meta)] * len(idx)
        neg = [image_prompt(vocab, tok.encode, args.negative_prompt, h, w, **meta)] * len(idx) \
            if sampling.guided else None
        codes = generate_vision(src.model, vocab, pos, h, w, frames=frames, sampling=sampling, negative=neg,
                                prefix=prefix, encode=tok.encode, seed=args.seed + b, device=device,
                                progress=_ticker(bar, len(idx))).numpy()
        for c in codes:
            c = c if prefix is None else np.concatenate([prefix, c])
            item = {"prompt": prompts[p], "seed": args.seed + b, "grid": [int(h), int(w)], "frames": len(c),
                    "codes": c}
            if prefix is not None:
                item["given_frames"] = given
            items.append(item)
    bar.close()
    return items


def _understand(args, src, vocab, tok, vq, grid: Grid, device) -> list[dict]:
    if args.text:
        prompts = _prompts(args)
        if not prompts:
            raise ValueError("--text needs --prompt or --prompts")
        seqs, allowed, images = [[vocab.bos, *tok.encode(p)] for p in prompts], None, None
    else:
        images = [_clip_codes(args, vq, grid, 4, image)[:1] for image in args.image]
        prompts = [f"{image} {args.question}".rstrip() for image in args.image]  # what the answers print
        seqs = [[vocab.bos, *vision_block(vocab, codes[0], tok.encode), *tok.encode(args.question)]
                for codes in images]
        allowed = torch.zeros(src.model_config.vocab_size, dtype=torch.bool)
        allowed[:vocab.text_size] = True
        allowed[vocab.eos] = True
    sampling = Sampling(0.0 if args.temperature is None else args.temperature, args.top_k, args.top_p)
    for p, s in zip(prompts, seqs):
        _check_length(src.model, len(s), args.max_new_tokens,
                      f"--max-new-tokens {args.max_new_tokens} after {p!r}")
    items, bar = [], _progress(args.max_new_tokens * len(prompts) * args.n, "text")
    for b, (p, idx) in enumerate(_batches(prompts, args.n, args.batch_size)):
        out = generate_text(src.model, vocab, [seqs[p]] * len(idx), args.max_new_tokens, sampling=sampling,
                            allowed=allowed, seed=args.seed + b, device=device,
                            progress=_ticker(bar, len(idx)))
        for ids in out:
            item = {"prompt": prompts[p], "seed": args.seed + b, "text": tok.decode(ids), "tokens": ids}
            if images is not None:
                item.update(prompt=args.question, grid=[int(x) for x in images[p].shape[1:]], frames=1,
                            codes=images[p], image=args.image[p])
            items.append(item)
    bar.close()
    return items


def _write(args, items: list[dict], vq, vocab, temporal: int) -> None:
    from PIL import Image

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    outputs.write_codes(items, out / "codes.json")
    if "text" in items[0]:
        for item in items:
            asked = f"{item['image']} {item['prompt']}".rstrip() if "image" in item else item["prompt"]
            print(f"{asked!r} -> {item['text']!r}", flush=True)
        return
    rows, labels = {}, {}
    for k, item in enumerate(items):
        frames = outputs.render(item["codes"], vq, vocab.codebook_size, temporal)
        if item["frames"] == 1:
            Image.fromarray(frames[0]).save(out / f"item_{k:04d}.png")
            rows.setdefault(item["prompt"], []).append(frames[0])
        else:
            outputs.write_gif(frames, args.fps, out / f"item_{k:04d}.gif")
            outputs.write_mp4(frames, args.fps, out / f"item_{k:04d}.mp4")
            step = len(frames) // item["frames"]  # one picture per code frame in the grid
            rows[k], labels[k] = frames[::step], f"{item['prompt']} (#{k})"
    keys = list(rows)
    outputs.write_grid([np.stack(rows[k]) for k in keys], [labels.get(k, k) for k in keys], out / "grid.png")
    print(f"wrote {len(items)} items to {out} (grid.png, codes.json)", flush=True)


def run(args) -> list[dict]:
    from emu3_train.model_source import load_model
    from emu3_train.tokenizer import load_tokenizer
    from emu3_train.vocab import get_vocab

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    src = load_model(_source_path(args.source), device)
    vocab = get_vocab(args.vocab) if args.vocab else src.vocab
    if vocab is None:
        raise ValueError(f"{args.source}: its vocabulary is not one of the presets; pass --vocab demo|emu3")
    if vocab.size > src.model_config.vocab_size:
        raise ValueError(f"--vocab {vocab.name}: {vocab.size} ids do not fit the model's "
                         f"{src.model_config.vocab_size} embedding rows ({args.source})")
    vq = None
    if args.vq:
        from emu3_train.vq import VisionTokenizer

        vq = VisionTokenizer(args.vq, device=device)
        if vq.codebook_size != vocab.codebook_size:
            raise ValueError(f"--vq {args.vq}: codebook of {vq.codebook_size} codes, the vocabulary "
                             f"{vocab.name!r} has {vocab.codebook_size}")
    grid = Grid(args, vq, vocab)
    tok = load_tokenizer(vocab)
    task = _understand if (args.text or args.image) else _vision
    items = task(args, src, vocab, tok, vq, grid, device)
    _write(args, items, vq, vocab, vq.temporal if vq is not None else 4)
    return items


def main(argv: list[str] | None = None) -> int:
    from emu3_train.config import ConfigError

    try:
        run(parse_args(argv))
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
