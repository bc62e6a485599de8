"""The generation engine: KV-cached decoding with the vision-block structure enforced, sampling
(temperature, top-k, top-p) on the device, and classifier-free guidance.

- :class:`Sampling`: how a token is chosen (``temperature=0`` is greedy) and the guidance scale s.
- :class:`Decoding`: one batch of token prompts on a model with a :class:`~emu3_train.model.kv_cache.KVCache`:
  :meth:`~Decoding.prefill` runs the prompts once, :meth:`~Decoding.step` feeds one token per
  sequence; both return fp32 next-token logits [B, V].
- :func:`generate_vision`: T frames of an h x w code grid after each prompt (which ends with the
  vision block's SOT, optionally followed by given frames to continue). The model chooses only
  visual codes; EOL ends each row and EOF each frame, placed by the engine. With guidance
  (``sampling.guidance_scale != 1``) the unconditional prompts (``negative``) run in the same
  batch and the codes are sampled from ``logits_u + s * (logits_c - logits_u)``.
- :func:`generate_text`: tokens after each prompt until a stop token (EOS) or ``max_new_tokens``,
  optionally restricted to ``allowed`` ids (captioning, question answering).
- :func:`image_prompt` / :func:`frame_tokens`: the token prompts the layout defines
  (``BOS caption SOV meta SOT``; the rows of given frames), built with ``layout.vision_block``.

    gen = dict(device="cpu", seed=0)
    pos = [image_prompt(vocab, tok.encode, "a red fox", 64, 64)]
    neg = [image_prompt(vocab, tok.encode, "", 64, 64)]
    codes = generate_vision(model, vocab, pos, 64, 64, negative=neg,
                            sampling=Sampling(temperature=1.0, top_k=2048, guidance_scale=3.0), **gen)

Every rank of a sharded model (FSDP2, tensor parallel) calls the same functions in lockstep:
``sync`` (``tensor -> tensor``) is applied to each sampled token batch (the trainer broadcasts
rank 0's), and ``length_multiple`` (the tp size under sequence parallelism) pads every forward to a
multiple of it: prompts with more left padding, decode steps with scratch tokens after the real
one whose cache slots the next step overwrites. Not under context parallelism.

Determinism: one ``torch.Generator`` on the model's device seeded with ``seed`` draws every
sampled token (exponential races, no host sync), so a seed gives the same tokens run after run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from emu3_train.layout import vision_block
from emu3_train.model.kv_cache import KVCache
from emu3_train.vocab import Vocab

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    temperature: logits are divided by it; 0 = greedy (argmax, top_k/top_p ignored).
    top_k: keep the k most likely tokens; 0 = all.
    top_p: keep the smallest set of most likely tokens whose probability reaches p; 1 = all.
    guidance_scale: classifier-free guidance s in ``logits_u + s * (logits_c - logits_u)``;
        1 = conditional only (no unconditional branch is run), 0 = unconditional only.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float = 1.0

    def __post_init__(self):
        checks = (("temperature", self.temperature >= 0, ">= 0"), ("top_k", self.top_k >= 0, ">= 0"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("guidance_scale", self.guidance_scale >= 0, ">= 0"))
        for name, ok, valid in checks:
            value = getattr(self, name)
            if not ok or value != value:  # NaN is never valid
                raise ValueError(f"sampling {name}={value} must be {valid}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0


def filter_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """fp32 logits [B, V] -> temperature-scaled logits with -inf outside top-k and top-p."""
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # probability mass ahead of each
        drop = before >= sampling.top_p  # the most likely token always stays (0 ahead of it)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, sampling: Sampling,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Token ids [B] (int64, on the logits' device) drawn from fp32 logits [B, V]."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, sampling).softmax(-1)
    # argmax(p / E), E ~ Exp(1), draws from p (an exponential race): no multinomial, no host sync
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)


def guide(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """[2n, V] logits of n conditional then n unconditional sequences -> guided [n, V]."""
    cond, uncond = logits.chunk(2)
    return uncond + scale * (cond - uncond)


class Decoding:
    """KV-cached decoding of a batch of token prompts (left-padded, per-sequence positions).

    Args:
        model: an ``Emu3CausalLM`` (plain, FSDP2 or tensor parallel), put in eval mode by the caller.
        prompts: token ids per sequence (lengths may differ; at least one token each).
        max_new_tokens: tokens that will be fed after the prompts (the cache is sized for them).
        device: where the inputs go (the model's device).
        length_multiple: every forward is padded to a multiple of it (module docstring).
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, device="cpu",
                 length_multiple: int = 1):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if length_multiple < 1:
            raise ValueError(f"length_multiple={length_multiple} must be >= 1")
        self.model, self.device, self.multiple = model, torch.device(device), int(length_multiple)
        longest = max(len(p) for p in prompts)
        limit = model.model.max_positions
        if longest + max_new_tokens > limit:
            raise ValueError(f"a prompt of {longest} tokens plus {max_new_tokens} generated ones is "
                             f"{longest + max_new_tokens} positions, more than model.max_position_embeddings="
                             f"{limit}")
        width = -(-longest // self.multiple) * self.multiple
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        pads = [width - len(p) for p in prompts]
        self.prompt_tokens = tokens.to(self.device)
        self.cache = KVCache(len(model.model.layers), torch.tensor(pads, device=self.device),
                             capacity=width + max_new_tokens + self.multiple - 1, no_padding=max(pads) == 0)
        self._scratch = torch.zeros(len(prompts), self.multiple, dtype=torch.long, device=self.device)

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    def _logits(self, hidden_last: torch.Tensor, rows: slice | None) -> torch.Tensor | None:
        """fp32 logits of the vocabulary ids ``rows`` (None: all); only those rows of the output head
        are multiplied (an image's codes are 32,768 of Emu3's 184,622 ids), except for a head that is
        a DTensor (tensor parallel: the full vocab-parallel logits, then the slice)."""
        if rows is not None and rows.stop is not None and rows.stop <= rows.start:
            return None  # the next token is placed: no head at all
        weight = self.model.lm_head.weight
        if rows is None or isinstance(weight, DTensor) or self.model.lm_head.bias is not None:
            logits = self.model.logits(hidden_last).float()
            return logits if rows is None else logits[:, rows]
        return torch.nn.functional.linear(hidden_last, weight[rows]).float()

    def prefill(self, rows: slice | None = None) -> torch.Tensor | None:
        """Run the prompts -> fp32 logits [B, V] of each sequence's next token (``rows``: only those
        ids, ``slice(0, 0)``: none)."""
        if self.cache.length:
            raise RuntimeError("prefill runs once, before any step")
        hidden = self.model(self.prompt_tokens, None, None, cache=self.cache)
        return self._logits(hidden[:, -1], rows)

    def step(self, tokens: torch.Tensor, rows: slice | None = None) -> torch.Tensor | None:
        """Feed one token per sequence (int64 [B] on the device) -> fp32 logits [B, V] of the next
        (``rows``: only those ids, ``slice(0, 0)``: none)."""
        start = self.cache.length
        if self.multiple == 1:
            hidden = self.model(tokens[:, None], None, None, cache=self.cache)
        else:  # scratch tokens after the real one; the next step overwrites their slots
            self._scratch[:, 0] = tokens
            hidden = self.model(self._scratch, None, None, cache=self.cache)
            self.cache.truncate(start + 1)
        return self._logits(hidden[:, 0], rows)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def frame_tokens(vocab: Vocab, codes: np.ndarray, encode: Encode) -> list[int]:
    """The tokens of given frames ``[T, h, w]`` inside a vision block (rows + EOL, EOF per frame),
    what follows SOT when a clip is continued."""
    block = vision_block(vocab, np.asarray(codes), encode)
    return block[block.index(vocab.sot) + 1:-1]


def image_prompt(vocab: Vocab, encode: Encode, caption: str | Sequence[int], height: int, width: int,
                 frames: int = 1, fps: float | None = None, duration: float | None = None) -> list[int]:
    """``BOS caption SOV meta SOT`` of an h x w image (``frames`` > 1: a video block of that many
    frames); ``caption`` text or token ids; ``""`` is the empty caption (the unconditional prompt).
    ``fps`` and ``duration`` (seconds): the video meta ``"T*h*w {fps}fps {duration}s"``
    (``layout.vision_block``), as video documents are tokenized; without them the meta is ``"h*w"``."""
    ids = encode(caption) if isinstance(caption, str) else list(caption)
    shape = (height, width) if frames == 1 and fps is None else (frames, height, width)
    block = vision_block(vocab, np.zeros(shape, np.int64), encode, fps=fps, duration=duration)
    return [vocab.bos, *ids, *block[:block.index(vocab.sot) + 1]]


def _vision_schedule(vocab: Vocab, height: int, width: int, frames: int) -> list[int | None]:
    """What each generated position holds: None = a sampled code, else the placed token id;
    the last entry is the last code (the block's closing EOL/EOF/EOV are never fed)."""
    frame = ([None] * width + [vocab.eol]) * height + [vocab.eof]
    return (frame * frames)[:-2]


@torch.no_grad()
def generate_vision(model, vocab: Vocab, prompts: Sequence[Sequence[int]], height: int, width: int, *,
                    frames: int = 1, sampling: Sampling = Sampling(),
                    negative: Sequence[Sequence[int]] | None = None, prefix: np.ndarray | None = None,
                    encode: Encode | None = None, seed: int = 0,
                    device="cpu", sync: Callable | None = None, length_multiple: int = 1,
                    progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Visual codes int64 [n, frames, height, width] (CPU) generated after each of n prompts.

    ``prompts``: token ids ending with the vision block's SOT (:func:`image_prompt`; its meta
    describes the whole clip). ``prefix``: codes [T0, h, w] or [n, T0, h, w] of frames to continue
    (their tokens are appended to every prompt, ``encode`` is then needed for ``frame_tokens``);
    the ``frames`` new frames follow them. ``negative``: n unconditional prompts, needed when
    ``sampling.guidance_scale != 1`` (the prefix frames are appended to them too).
    ``progress``: called with 1 after each generated position (codes and placed EOL/EOF alike; a
    progress bar's tokens/s), on the host, without a device sync.
    """
    if height < 1 or width < 1 or frames < 1:
        raise ValueError(f"a {frames} x {height} x {width} grid is empty: frames, height and width "
                         "must be >= 1")
    n = len(prompts)
    seqs = [list(p) for p in prompts]
    if sampling.guided:
        if negative is None or len(negative) != n:
            raise ValueError(f"guidance_scale={sampling.guidance_scale} needs one negative prompt per "
                             f"prompt ({n}), got {None if negative is None else len(negative)}")
        seqs += [list(p) for p in negative]
    if prefix is not None:
        if encode is None:
            raise ValueError("continuing frames (prefix=...) needs encode= to write their block")
        prefix = np.asarray(prefix)
        clips = [prefix] * n if prefix.ndim == 3 else list(prefix)
        if len(clips) != n or any(c.shape[1:] != (height, width) for c in clips):
            raise ValueError(f"prefix of shape {prefix.shape} does not hold [T0, {height}, {width}] frames "
                             f"for {n} prompts")
        seqs = [s + frame_tokens(vocab, clips[i % n], encode) for i, s in enumerate(seqs)]
    schedule = _vision_schedule(vocab, height, width, frames)
    was_training = model.training
    model.eval()
    try:
        dec = Decoding(model, seqs, len(schedule), device=device, length_multiple=length_multiple)
        dev = dec.prompt_tokens.device
        generator = _generator(dev, seed)
        placed = {t: torch.full((len(seqs),), t, dtype=torch.long, device=dev)
                  for t in set(schedule) - {None}}
        codes = torch.empty(n, frames * height * width, dtype=torch.long, device=dev)
        lo, hi = vocab.vision_start, vocab.vision_start + vocab.codebook_size
        # the head multiplies the codebook's rows only, and nothing before a placed token
        need = [slice(lo, hi) if item is None else slice(0, 0) for item in schedule]
        logits, c = dec.prefill(need[0]), 0
        for i, item in enumerate(schedule):
            if item is None:
                scores = logits
                if sampling.guided:
                    scores = guide(scores, sampling.guidance_scale)
                code = sample_tokens(scores, sampling, generator)
                if sync is not None:
                    code = sync(code).to(dev)
                codes[:, c] = code
                c += 1
                token = (code + lo).repeat(len(seqs) // n)
            else:
                token = placed[item]
            if i + 1 < len(schedule):
                logits = dec.step(token, need[i + 1])
            if progress is not None:
                progress(1)
    finally:
        model.train(was_training)
    return codes.view(n, frames, height, width).cpu()


@torch.no_grad()
def generate_text(model, vocab: Vocab, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                  sampling: Sampling = Sampling(temperature=0.0), allowed: torch.Tensor | None = None,
                  stop: Sequence[int] | None = None, seed: int = 0, device="cpu",
                  sync: Callable | None = None, length_multiple: int = 1,
                  progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Token ids generated after each prompt, the stop token excluded, at most ``max_new_tokens``.

    ``allowed``: bool [V] of the ids the model may choose (None: all); ``stop``: ids that end a
    sequence (None: ``vocab.eos``). Greedy by default. Sequences run in lockstep until all stopped.
    ``progress``: called with 1 after each generated position (as in :func:`generate_vision`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    stop = [vocab.eos] if stop is None else list(stop)
    was_training = model.training
    model.eval()
    try:
        dec = Decoding(model, prompts, max_new_tokens, device=device, length_multiple=length_multiple)
        dev = dec.prompt_tokens.device
        generator = _generator(dev, seed)
        bias = None
        if allowed is not None:
            bias = torch.zeros(allowed.shape, device=dev).masked_fill(~allowed.to(dev), float("-inf"))
        stops = torch.tensor(stop, dtype=torch.long, device=dev)
        out = torch.empty(len(prompts), max_new_tokens, dtype=torch.long, device=dev)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
        logits = dec.prefill()
        steps = 0
        for steps in range(1, max_new_tokens + 1):
            scores = logits[:, :len(bias)] + bias if bias is not None else logits
            token = sample_tokens(scores, sampling, generator)
            if sync is not None:
                token = sync(token).to(dev)
            out[:, steps - 1] = token
            done |= torch.isin(token, stops)
            if progress is not None:
                progress(1)
            if steps == max_new_tokens or bool(done.all()):
                break
            logits = dec.step(token)
    finally:
        model.train(was_training)
    result = []
    for row in out[:, :steps].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        result.append(row[:cut])
    return result
