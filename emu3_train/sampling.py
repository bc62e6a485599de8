"""Generation with the image structure enforced: the model chooses only the visual codes.

For a text prompt the sequence is ``BOS caption SOV "h*w" SOT``; then, row by row, the model
samples w visual codes (logits restricted to the codebook) and the sampler writes EOL after each
row, EOF and EOV after the grid, so the layout is always exactly the known grid. Captioning
(image -> text) decodes greedily over text ids and EOS.

No KV cache yet: each step re-runs the prompt (fine for the demo's ~110-token documents and
for in-run samples of small code grids; slow for full-size Emu3 images).

``sync``: an optional ``tensor -> tensor`` applied to every sampled token batch (the trainer
broadcasts rank 0's choice, so ranks sampling in lockstep on a sharded model never diverge);
``length_multiple``: inputs are left-padded to a multiple of it (tp, for sequence parallelism).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from emu3_train.layout import vision_block
from emu3_train.vocab import Vocab


def _last_logits(model, seqs: Sequence[Sequence[int]], device, multiple: int = 1) -> torch.Tensor:
    """Logits ``[n, V]`` (fp32) at the last position of each sequence (left-padded, own segment,
    to a length that is a multiple of ``multiple``: sequence parallelism shards it tp ways)."""
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


def _sample(logits: torch.Tensor, temperature: float, top_k: int, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate_images(model, vocab: Vocab, encode: Callable[[str], list[int]], captions: Sequence[str],
                    height: int, width: int, *, temperature: float = 1.0, top_k: int = 0,
                    seed: int = 0, device="cpu", sync: Callable | None = None,
                    length_multiple: int = 1) -> torch.Tensor:
    """Visual codes ``[n, height, width]`` generated for each caption (text -> image)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    seqs = [[vocab.bos, *encode(c), vocab.sov, *encode(f"{height}*{width}"), vocab.sot] for c in captions]
    codes = torch.zeros(len(seqs), height, width, dtype=torch.long)
    lo, hi = vocab.vision_start, vocab.vision_start + vocab.codebook_size
    for r in range(height):
        for c in range(width):
            logits = _last_logits(model, seqs, device, length_multiple)[:, lo:hi]
            code = _sample(logits, temperature, top_k, generator).cpu()
            if sync is not None:
                code = sync(code)
            codes[:, r, c] = code
            for s, k in zip(seqs, code.tolist()):
                s.append(lo + k)
        for s in seqs:
            s.append(vocab.eol)
    model.train(was_training)
    return codes


@torch.no_grad()
def caption_images(model, vocab: Vocab, encode: Callable[[str], list[int]], images: torch.Tensor,
                   *, max_new_tokens: int = 40, device="cpu",
                   sync: Callable | None = None, length_multiple: int = 1) -> list[list[int]]:
    """Greedy captions (text ids, EOS excluded) of images ``[n, h, w]`` of visual codes."""
    was_training = model.training
    model.eval()
    seqs = [[vocab.bos, *vision_block(vocab, img.numpy(), encode)] for img in images]
    out: list[list[int]] = [[] for _ in seqs]
    done = [False] * len(seqs)
    allowed = torch.full((vocab.size,), float("-inf"), device=device)
    allowed[: vocab.text_size] = 0
    allowed[vocab.eos] = 0
    for _ in range(max_new_tokens):
        logits = _last_logits(model, seqs, device, length_multiple)[:, : vocab.size] + allowed
        nxt = logits.argmax(-1).cpu()
        nxt = (sync(nxt) if sync is not None else nxt).tolist()
        for i, t in enumerate(nxt):
            if not done[i]:
                if t == vocab.eos:
                    done[i] = True
                else:
                    out[i].append(t)
            seqs[i].append(t)
        if all(done):
            break
    model.train(was_training)
    return out
