"""Emu3's vision tokenizer, both directions: RGB pixels -> visual codes -> RGB pixels.

``VisionTokenizer(PATH)`` loads ``Emu3VQVAE`` from a directory saved by
``Emu3VQVAE.save_pretrained`` and the resize/normalize settings of ``Emu3ImageProcessor`` from
its ``preprocessor_config.json`` (without one, Emu3 VisionTokenizer's: mean = std = 0.5,
min 512², max 1024² pixels, factor 8, bicubic).

- Resize (:class:`ResizeSpec`, picklable, used by the offline tool's decode processes without
  importing torch or transformers): an H0×W0 RGB image goes to ``smart_resize``'s H×W (multiples of
  ``factor`` with ``min_pixels <= H*W <= max_pixels``, about the same aspect ratio; the same rule
  as ``transformers.models.emu3.image_processing_emu3.smart_resize``, checked in the tests) with
  PIL's resampling, exactly as the processor does it.
- Normalize: ``(uint8 * rescale_factor - mean) / std`` in the processor's arithmetic (float64
  product, float32 result), on the VQ's device; the pixels equal the processor's bit for bit.
- Encode: ``Emu3VQVAE.encode`` gives ``H/8 × W/8`` codes per image (an image is 4 copies of itself
  in time); a clip of T frames is cut into ``ceil(T/4)`` chunks of 4 (the last padded with its last
  frame), each encoded on its own as Emu3's reference video code does.
- Decode: :meth:`VisionTokenizer.decode` turns codes ``[n, h, w]`` into uint8 RGB ``[n, H, W, 3]``
  (``Emu3VQVAE.decode``, then the processor's mean/std undone); :meth:`decode_clip` turns a clip's
  ``[t, h, w]`` into ``[4t, H, W, 3]`` frames. Same contract as ``samples.CodeRenderer``'s VQ path.

    vt = VisionTokenizer("/models/Emu3-VisionTokenizer-hf", device="cuda")
    codes = vt.encode_images([Image.open("cat.jpg")])[0]        # [h, w] int64
    rgb = vt.decode(codes[None])[0]                               # [8h, 8w, 3] uint8

A ``PATH`` from the Hugging Face Emu3 checkpoints: ``Emu3ForConditionalGeneration
.from_pretrained(REPO).model.vqmodel.save_pretrained(PATH)`` and ``Emu3ImageProcessor
.from_pretrained(REPO).save_pretrained(PATH)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EMU3_MEAN_STD = (0.5, 0.5, 0.5)  # Emu3 VisionTokenizer normalizes pixels to [-1, 1]
MAX_ASPECT = 200  # smart_resize refuses images more elongated than this
_NO_CROP = 2**30  # image_sizes that make Emu3VQVAE.encode's crop a no-op (see encode_clip_pixels)
_RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


@dataclass(frozen=True)
class ResizeSpec:
    """What ``Emu3ImageProcessor`` does to an RGB image before the VQ (picklable)."""

    factor: int = 8
    min_pixels: int = 512 * 512
    max_pixels: int = 1024 * 1024
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = EMU3_MEAN_STD
    std: tuple[float, ...] = EMU3_MEAN_STD

    @classmethod
    def from_processor(cls, p) -> ResizeSpec:
        return cls(int(p.spatial_factor), int(p.min_pixels), int(p.max_pixels), int(p.resample),
                   bool(p.do_resize), float(p.rescale_factor) if p.do_rescale else 1.0,
                   tuple(float(m) for m in p.image_mean) if p.do_normalize else (0.0,) * 3,
                   tuple(float(s) for s in p.image_std) if p.do_normalize else (1.0,) * 3)

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(H, W)`` the processor resizes a ``height×width`` image to (transformers' smart_resize);
        ``ValueError`` for an aspect ratio above 200."""
        if not self.do_resize:
            return height, width
        f = self.factor
        if max(height, width) / min(height, width) > MAX_ASPECT:
            raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT}, got "
                             f"{max(height, width) / min(height, width)}")
        h_bar, w_bar = round(height / f) * f, round(width / f) * f
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt((height * width) / self.max_pixels)
            h_bar = max(f, math.floor(height / beta / f) * f)
            w_bar = max(f, math.floor(width / beta / f) * f)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / f) * f
            w_bar = math.ceil(width * beta / f) * f
        return h_bar, w_bar

    def resize(self, image) -> np.ndarray:
        """uint8 ``[H, W, 3]`` of an RGB PIL image (or uint8 ``[H0, W0, 3]``) at :meth:`resized_shape`."""
        from PIL import Image

        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if image.mode != "RGB":
            raise ValueError(f"resize expects an RGB image, got mode {image.mode}")
        h, w = self.resized_shape(image.height, image.width)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), resample=self.resample)
        return np.array(image)  # a writable copy (torch refuses to wrap read-only arrays)


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _processor_spec(vq_path: Path) -> ResizeSpec:
    """The processor settings saved in ``vq_path`` (Emu3 VisionTokenizer's without a config)."""
    if not (vq_path / "preprocessor_config.json").is_file():
        return ResizeSpec()
    from transformers import Emu3ImageProcessor

    return ResizeSpec.from_processor(Emu3ImageProcessor.from_pretrained(vq_path))


class VisionTokenizer:
    """Emu3's VQ-VAE with the image processor's resize/normalize (module docstring).

    ``vq_path``: directory of ``Emu3VQVAE.save_pretrained`` (and optionally the processor's
    ``preprocessor_config.json``). ``min_pixels``/``max_pixels`` override the processor's.
    ``batch_size``: images (or 4-frame chunks) per ``Emu3VQVAE.encode`` call.
    """

    def __init__(self, vq_path: str | os.PathLike, device: str = "auto", min_pixels: int | None = None,
                 max_pixels: int | None = None, batch_size: int = 8):
        import dataclasses

        import torch
        from transformers import Emu3VQVAE

        vq_path = Path(vq_path)
        if not (vq_path / "config.json").is_file():
            raise FileNotFoundError(f"{vq_path}: not a saved Emu3VQVAE (no config.json)")
        spec = _processor_spec(vq_path)
        spec = dataclasses.replace(
            spec, min_pixels=spec.min_pixels if min_pixels is None else int(min_pixels),
            max_pixels=spec.max_pixels if max_pixels is None else int(max_pixels))
        if not 0 < spec.min_pixels <= spec.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {spec.min_pixels} and "
                             f"{spec.max_pixels}")
        self.spec = spec
        self.device = _pick_device(device)
        vq, info = Emu3VQVAE.from_pretrained(vq_path, output_loading_info=True)
        missing = sorted(info["missing_keys"]) + sorted(k for k, *_ in info["mismatched_keys"])
        if missing:  # from_pretrained would leave them random: the codes would be noise
            raise ValueError(f"{vq_path}: {len(missing)} Emu3VQVAE weights are missing or mismatched (e.g. "
                             f"{missing[0]}); save the VQ-VAE of an HF-format Emu3 checkpoint there")
        self.vq = vq.to(self.device).eval()
        self.spatial = int(self.vq.vision_spatial_factor)
        self.temporal = int(self.vq.config.temporal_downsample_factor)
        self.codebook_size = int(self.vq.config.codebook_size)
        if spec.factor % self.spatial:
            raise ValueError(f"{vq_path}: the processor resizes to multiples of {spec.factor}, which "
                             f"the VQ-VAE's downsampling {self.spatial} does not divide")
        self.batch_size = max(1, int(batch_size))
        self._torch = torch

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """Pixel size ``(H, W)`` the processor gives an ``height×width`` image."""
        return self.spec.resized_shape(height, width)

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Code grid ``(h, w)`` of an ``height×width`` image."""
        rh, rw = self.resized_shape(height, width)
        return rh // self.spatial, rw // self.spatial

    def pixels(self, rgb) -> torch.Tensor:  # noqa: F821 (torch is imported lazily)
        """Normalized float ``[..., 3, H, W]`` on the device of uint8 RGB ``[..., H, W, 3]`` (the
        processor's rescale + normalize, same arithmetic)."""
        torch = self._torch
        x = torch.as_tensor(np.asarray(rgb)).to(self.device)
        x = (x.to(torch.float64) * self.spec.rescale_factor).to(torch.float32)
        mean = torch.tensor(self.spec.mean, dtype=torch.float32, device=self.device)
        std = torch.tensor(self.spec.std, dtype=torch.float32, device=self.device)
        return ((x - mean) / std).movedim(-1, -3).contiguous()

    def encode_pixels(self, pixels) -> np.ndarray:
        """int64 codes ``[B, h, w]`` of ``[B, 3, H, W]`` pixels (``Emu3VQVAE.encode``, batch_size a call)."""
        torch = self._torch
        _, _, h, w = pixels.shape
        if h % self.spatial or w % self.spatial:
            raise ValueError(f"{h}x{w} pixels are not a multiple of the VQ-VAE's downsampling {self.spatial}")
        codes = []
        with torch.inference_mode():
            for chunk in pixels.split(self.batch_size):
                sizes = torch.tensor([[h, w]] * len(chunk))
                tokens = self.vq.encode(chunk.to(self.device), image_sizes=sizes).image_tokens
                codes.append(torch.stack(list(tokens)).cpu())
        out = torch.cat(codes).numpy().astype(np.int64)
        if out.shape[1:] != (h // self.spatial, w // self.spatial):
            raise RuntimeError(f"VQ-VAE gave a {out.shape[1:]} grid for {h}x{w} pixels")
        return out

    def encode_clip_pixels(self, pixels) -> np.ndarray:
        """int64 codes ``[ceil(T/4), h, w]`` of a clip's ``[T, 3, H, W]`` pixels (4 = temporal factor).

        The frames are cut into chunks of ``temporal`` frames (the last padded with copies of the
        last frame); each chunk is one sample of a 5-D ``Emu3VQVAE.encode`` call.
        """
        torch = self._torch
        t, c, h, w = pixels.shape
        k = self.temporal
        pad = -t % k
        if pad:
            pixels = torch.cat([pixels, pixels[-1:].expand(pad, c, h, w)])
        chunks = pixels.reshape(-1, k, c, h, w)
        codes = []
        with torch.inference_mode():
            for batch in chunks.split(self.batch_size):
                # encode() crops each sample's codes as if they were [h, w]; for a [1, h, w] chunk that
                # would cut the wrong axes, so ask for a crop larger than any grid (a no-op).
                sizes = torch.tensor([[_NO_CROP, _NO_CROP]] * len(batch))
                tokens = self.vq.encode(batch.to(self.device), image_sizes=sizes).image_tokens
                codes.extend(tok.reshape(-1, *tok.shape[-2:]).cpu() for tok in tokens)
        out = torch.cat(codes).numpy().astype(np.int64)
        if out.shape != (math.ceil(t / k), h // self.spatial, w // self.spatial):
            raise RuntimeError(f"VQ-VAE gave codes {out.shape} for a {t}-frame {h}x{w} clip")
        return out

    def encode_images(self, images: Sequence) -> list[np.ndarray]:
        """Codes ``[h, w]`` of each RGB PIL image, one ``encode`` call per image (the reference the
        batched offline tool is tested against)."""
        return [self.encode_pixels(self.pixels(self.spec.resize(im)[None]))[0] for im in images]

    def encode_video(self, frames: Sequence) -> np.ndarray:
        """Codes ``[ceil(T/4), h, w]`` of a clip of T RGB PIL frames (or uint8 arrays) of one size."""
        return self.encode_clip_pixels(self.pixels(np.stack([self.spec.resize(f) for f in frames])))

    def _to_rgb(self, pixels) -> np.ndarray:
        torch = self._torch
        mean = torch.tensor(self.spec.mean, device=pixels.device).view(-1, 1, 1)
        std = torch.tensor(self.spec.std, device=pixels.device).view(-1, 1, 1)
        rgb = (pixels.float() * std + mean) / self.spec.rescale_factor
        return rgb.clamp(0, 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()

    def decode(self, codes) -> np.ndarray:
        """uint8 RGB ``[n, H, W, 3]`` of codes ``[n, h, w]`` (``H = 8h``): ``Emu3VQVAE.decode``."""
        torch = self._torch
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.long, device=self.device)
        if codes.ndim != 3:
            raise ValueError(f"codes must be [n, h, w], got shape {tuple(codes.shape)}")
        with torch.inference_mode():
            return self._to_rgb(self.vq.decode(codes))

    def decode_clip(self, codes) -> np.ndarray:
        """uint8 RGB frames ``[4t, H, W, 3]`` of a clip's codes ``[t, h, w]`` (one 5-D decode)."""
        torch = self._torch
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.long, device=self.device)
        if codes.ndim != 3:
            raise ValueError(f"clip codes must be [t, h, w], got shape {tuple(codes.shape)}")
        with torch.inference_mode():
            return self._to_rgb(self.vq.decode(codes[None])[0])
