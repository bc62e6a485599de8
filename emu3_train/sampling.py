"""Text-to-image and captioning on top of the generation engine (``emu3_train/generation.py``),
for in-run samples and the demo evaluation.

- :func:`generate_images`: captions -> code grids [n, h, w]; the model chooses only visual codes
  (EOL/EOF are placed), KV-cached, optionally with classifier-free guidance against a negative
  prompt (default the empty caption).
- :func:`caption_images`: code grids -> greedy captions over text ids, stopping at EOS.
- :func:`full_recompute_logits`: the uncached reference: every call reruns whole sequences
  (tests compare the engine against it).

``sync`` / ``length_multiple``: see ``emu3_train/generation.py`` (sharded models in lockstep).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from emu3_train.generation import Sampling, generate_text, generate_vision, image_prompt
from emu3_train.layout import vision_block
from emu3_train.vocab import Vocab


def full_recompute_logits(model, seqs: Sequence[Sequence[int]], device, multiple: int = 1) -> torch.Tensor:
    """Logits ``[n, V]`` (fp32) at the last position of each sequence, recomputed from scratch
    (left-padded, padding its own segment, to a length that is a multiple of ``multiple``)."""
    n, length = len(seqs), -(-max(len(s) for s in seqs) // multiple) * multiple
    tokens = torch.zeros(n, length, dtype=torch.long)
    positions = torch.zeros(n, length, dtype=torch.long)
    bounds = [0]
    for i, s in enumerate(seqs):
        pad = length - len(s)
        tokens[i, pad:] = torch.as_tensor(s, dtype=torch.long)
        positions[i, :pad] = torch.arange(pad)
        positions[i, pad:] = torch.arange(len(s))
        if pad:
            bounds.append(i * length + pad)
        bounds.append((i + 1) * length)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    hidden = model(tokens.to(device), positions.to(device), cu)
    return model.logits(hidden[:, -1]).float()


def generate_images(model, vocab: Vocab, encode: Callable[[str], list[int]], captions: Sequence[str],
                    height: int, width: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    guidance_scale: float = 1.0, negative_prompt: str = "", seed: int = 0, device="cpu",
                    sync: Callable | None = None, length_multiple: int = 1) -> torch.Tensor:
    """Visual codes ``[n, height, width]`` generated for each caption (text -> image).
    ``guidance_scale`` != 1: classifier-free guidance against ``negative_prompt`` ("" = the empty
    caption, the branch ``data.caption_dropout`` trains)."""
    sampling = Sampling(temperature, top_k, top_p, guidance_scale)
    prompts = [image_prompt(vocab, encode, c, height, width) for c in captions]
    negative = [image_prompt(vocab, encode, negative_prompt, height, width)] * len(captions) \
        if sampling.guided else None
    codes = generate_vision(model, vocab, prompts, height, width, sampling=sampling, negative=negative,
                            seed=seed, device=device, sync=sync, length_multiple=length_multiple)
    return codes[:, 0]


def caption_images(model, vocab: Vocab, encode: Callable[[str], list[int]], images: torch.Tensor,
                   *, max_new_tokens: int = 40, device="cpu",
                   sync: Callable | None = None, length_multiple: int = 1) -> list[list[int]]:
    """Greedy captions (text ids, EOS excluded) of images ``[n, h, w]`` of visual codes."""
    prompts = [[vocab.bos, *vision_block(vocab, img.numpy(), encode)] for img in images]
    allowed = torch.zeros(vocab.size, dtype=torch.bool)
    allowed[: vocab.text_size] = True
    allowed[vocab.eos] = True
    return generate_text(model, vocab, prompts, max_new_tokens, allowed=allowed, device=device, sync=sync,
                         length_multiple=length_multiple)
