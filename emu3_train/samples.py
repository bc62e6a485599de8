"""In-run samples: every ``trainer.sample_interval`` steps, images for fixed prompts and a caption
for a fixed image, so a person can watch both directions of the model learn.

- ``samples/images``: one grid row per prompt (``sample.prompts``), ``sample.per_prompt`` images
  each, sampled with ``sample.seed`` (the same every time, so rows are comparable across steps)
  by the KV-cached engine (``emu3_train/generation.py``): temperature, top-k, top-p, and
  classifier-free guidance when ``sample.guidance_scale`` != 1 (against ``sample.negative_prompt``,
  "" = the empty caption). The grid is the data's own (the first data image's) unless
  ``sample.height``/``sample.width`` say otherwise.
- ``samples/caption``: the first image of the training data (the first document with a vision
  block, in shard order), captioned greedily; logged as that image with the caption under it.

Codes become pixels through the Emu3 VQ-VAE decoder when ``sample.vq_path`` names an
``Emu3VQVAE.save_pretrained`` folder; otherwise each code is drawn as a gray level (exact for the
demo's intensity codebook, a structural view for a learned one). Files land in
``<run_dir>/samples/step_NNNNNN.png`` and ``..._caption.png``.

    python -m emu3_train.train experiment=demo trainer.sample_interval=600
    python -m emu3_train.train experiment=stage1 ... trainer.sample_interval=2000 sample.vq_path=/vq \\
        'sample.prompts=["a red fox in snow","a city skyline at night"]' sample.guidance_scale=3.0

Sampling runs on every rank in lockstep (FSDP and TP forwards are collective); each sampled
token is broadcast from rank 0 so the ranks can never disagree. Not under context parallelism
(the CP attention cores expect sharded rows): the trainer skips samples there and says so once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from emu3_train.config import SampleConfig
from emu3_train.layout import parse_vision_block
from emu3_train.sampling import caption_images, generate_images
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import Vocab

DEFAULT_PROMPTS = ("a photo of a cat sitting on a sofa", "a red car parked on a city street",
                   "a bowl of fresh fruit on a wooden table", "a mountain lake at sunrise")


def first_image(source, vocab: Vocab, decode: Callable) -> np.ndarray | None:
    """Codes ``[h, w]`` (first frame) of the first document of ``source`` with a vision block."""
    with_block = np.flatnonzero(np.asarray(source.max_block) > 0)
    if not len(with_block):
        return None
    d = int(with_block[0])
    tokens, _ = source.read(d)
    start, end = (int(x) for x in source.vision_spans(d)[0])
    return parse_vision_block(tokens[start:end], vocab, decode)[0]


class CodeRenderer:
    """Visual codes ``[n, h, w]`` -> uint8 RGB ``[n, H, W, 3]``: the VQ-VAE's decoder
    (``emu3_train.vq.VisionTokenizer.decode``, the module ``tokenize_images`` and ``generate`` use), or
    one gray level per code (exact for the demo's 17 gray levels)."""

    def __init__(self, codebook_size: int, vq_path: str | None = None, device="cpu", scale: int = 8):
        self.codebook_size, self.scale = codebook_size, scale
        self.vq = None
        if vq_path:
            from emu3_train.vq import VisionTokenizer

            self.vq = VisionTokenizer(vq_path, device=str(device))
            if self.vq.codebook_size != codebook_size:
                raise ValueError(f"sample.vq_path={vq_path} has codebook_size "
                                 f"{self.vq.codebook_size}, the vocabulary {codebook_size}")

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if self.vq is not None:
            return self.vq.decode(codes)
        gray = (255 - codes * 255 // max(1, self.codebook_size - 1)).astype(np.uint8)  # ink dark
        gray = gray.repeat(self.scale, axis=-2).repeat(self.scale, axis=-1)
        return np.repeat(gray[..., None], 3, axis=-1)


def save_rows(images: np.ndarray, labels: list[str], path: Path) -> None:
    """``images [rows, cols, H, W, 3]`` -> one PNG, a text label above each row."""
    from PIL import Image, ImageDraw

    rows, cols, h, w, _ = images.shape
    gap, label = 4, 14
    text_width = 6 * max(len(t) for t in labels) + 2 * gap  # PIL's default font: ~6 px a character
    size = (max(cols * (w + gap) + gap, text_width), rows * (h + gap + label) + gap)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        y = gap + r * (h + gap + label)
        draw.text((gap, y), labels[r], fill="black")
        for c in range(cols):
            canvas.paste(Image.fromarray(images[r, c]), (gap + c * (w + gap), y + label))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


class InRunSampler:
    """Generates, renders and saves one round of samples; the trainer logs what it returns."""

    def __init__(self, cfg: SampleConfig, vocab: Vocab, source, run_dir: Path, device):
        self.cfg, self.vocab, self.device = cfg, vocab, torch.device(device)
        self.out = Path(run_dir) / "samples"
        self.tok = load_tokenizer(vocab)
        self.image = first_image(source, vocab, self.tok.decode)
        shape = self.image.shape if self.image is not None else (0, 0)
        self.height, self.width = cfg.height or shape[0], cfg.width or shape[1]
        if not (self.height and self.width):
            raise ValueError(f"the data under {source.path} has no image: set sample.height and "
                             "sample.width for in-run samples")
        self.prompts = list(cfg.prompts) or list(DEFAULT_PROMPTS)
        self.render = CodeRenderer(vocab.codebook_size, cfg.vq_path, self.device)

    def __call__(self, model, step: int, sync: Callable | None = None, write: bool = True,
                 length_multiple: int = 1) -> dict:
        """Sample with ``model`` (every rank calls this); files only where ``write``.
        ``length_multiple``: the tensor-parallel size (sequence parallelism shards inputs tp ways)."""
        cfg, n = self.cfg, self.cfg.per_prompt
        prompts = [p for p in self.prompts for _ in range(n)]
        codes = generate_images(model, self.vocab, self.tok.encode, prompts, self.height, self.width,
                                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                guidance_scale=cfg.guidance_scale, negative_prompt=cfg.negative_prompt,
                                seed=cfg.seed, device=self.device, sync=sync, length_multiple=length_multiple)
        caption = None
        if self.image is not None:
            ids = caption_images(model, self.vocab, self.tok.encode, torch.as_tensor(self.image[None]),
                                 max_new_tokens=cfg.max_caption_tokens, device=self.device, sync=sync,
                                 length_multiple=length_multiple)
            caption = self.tok.decode(ids[0]).strip()
        if not write:
            return {} if caption is None else {"caption": caption}
        images = self.render(codes.numpy())
        grid = self.out / f"step_{step:06d}.png"
        save_rows(images.reshape(len(self.prompts), n, *images.shape[1:]), self.prompts, grid)
        result = {"images": grid, "prompts": self.prompts}
        if caption is not None:
            result["caption"] = caption
            result["caption_image"] = self.out / f"step_{step:06d}_caption.png"
            save_rows(self.render(self.image[None])[None], [caption or "(empty caption)"],
                      result["caption_image"])
        return result
