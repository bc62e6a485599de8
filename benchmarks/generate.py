"""Generation speed: our KV-cached engine vs full recompute, and vs transformers' own ``generate``.

All sides run in this one process on the same weights, greedy, the same batch, prompt and number
of generated tokens; each timing is the best of ``--repeats`` runs, sides interleaved (on a shared
machine the least disturbed run). Tokens/s counts generated positions x batch over the wall time
of the whole call (prefill included).

1. **Cache vs no cache** (``generation.generate_vision``, the code grid enforced): the baseline
   recomputes the whole growing prefix for every token (``sampling.full_recompute_logits``: no
   cache at all). At the demo size (tiny model, demo vocabulary, 8x8 grid) every step is run and
   the codes must be identical; at a 64x64 grid (4,160 positions, Emu3 vocabulary) the baseline's
   step time is measured at ``--probes`` prefix lengths spread evenly over the generation and its
   tokens/s is 1 / their mean step time (an estimate of the full run, which would take hours).
2. **vs transformers**: the model exported by ``interop.hf.save_hf``, loaded by
   ``Emu3ForCausalLM.from_pretrained`` and run by its ``generate(do_sample=False,
   min_new_tokens=max_new_tokens=N)`` with its own dynamic KV cache, against our
   ``generate_text`` (no stop token, EOS masked as ``min_new_tokens`` masks it: the same work) --
   their tokens must be identical; and our ``generate_vision`` (grid enforced, the path images
   take) against ``generate`` with BAAI's ``prefix_allowed_tokens_fn`` grid constraint -- their
   codes must be identical.
3. **Cache memory**: the bytes of our cache's K/V buffers after the run vs the formula
   ``2 (K, V) x layers x batch x kv_heads x capacity x head_dim x bytes``, and the formula for
   Emu3-8B (32 layers, 8 KV heads of 128, bf16) at 720x720 (90x90 codes) with guidance (batch 2).

    python benchmarks/generate.py                       # CPU: the README rows (~4 min, one thread)
    python benchmarks/generate.py --smoke               # seconds: tiny sizes, checks only
    python benchmarks/generate.py --device cuda --batch 8

Ends with one JSON line: {"demo": {...}, "grid64": {...}, "cache_bytes", "cache_formula_bytes",
"emu3_8b_720_cfg_cache_gb", ...}; exit 1 if any two sides disagree on the tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from emu3_train.config import ModelConfig
from emu3_train.generation import Decoding, Sampling, generate_text, generate_vision, image_prompt
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.sampling import full_recompute_logits
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

TINY = dict(hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2,
            rope_theta=1_000_000.0, max_position_embeddings=8192)  # recipes/model/tiny.yaml
PROMPT = "a handwritten digit seven"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _model(vocab, device, seed=0) -> Emu3CausalLM:
    torch.manual_seed(seed)
    model = Emu3CausalLM(ModelConfig(**TINY, vocab_size=vocab.size), vocab.size)
    with torch.no_grad():  # init-sized weights give near-uniform logits: greedy ties would be luck
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    return model.to(device).eval()


@torch.no_grad()
def _no_cache_step(model, seqs, device) -> torch.Tensor:
    return full_recompute_logits(model, seqs, device)


@torch.no_grad()
def no_cache_vision(model, vocab, prompts, h, w, device) -> torch.Tensor:
    """Greedy codes [B, h*w] with a full recompute per position (the grid placed as the engine does)."""
    from emu3_train.generation import _vision_schedule

    lo, hi = vocab.vision_start, vocab.vision_start + vocab.codebook_size
    seqs, codes = [list(p) for p in prompts], []
    for item in _vision_schedule(vocab, h, w, 1):
        if item is None:
            code = _no_cache_step(model, seqs, device)[:, lo:hi].argmax(-1).cpu()
            codes.append(code)
            item = (code + lo).tolist()
        else:
            item = [item] * len(seqs)
        for s, t in zip(seqs, item):
            s.append(int(t))
    return torch.stack(codes, 1)


def _hf_model(model, cfg, vocab, folder: Path, device):
    import transformers

    from emu3_train.interop.hf import save_hf

    save_hf(model.cpu(), cfg, folder, {"pad_token_id": vocab.pad, "bos_token_id": vocab.bos,
                                       "eos_token_id": vocab.eos})
    model.to(device)
    return transformers.Emu3ForCausalLM.from_pretrained(folder).to(device).eval()


@torch.no_grad()
def _hf_generate(hf, prompts, n, vocab, device, allowed=None) -> list[list[int]]:
    ids = torch.tensor(prompts, device=device)  # one prompt repeated: no padding
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=vocab.pad, eos_token_id=vocab.eos,
                      prefix_allowed_tokens_fn=allowed)
    return out[:, ids.shape[1]:].tolist()


def _grid_allowed(vocab, h, w, prompt_len):
    """BAAI's way of constraining a grid in ``generate``: ``prefix_allowed_tokens_fn`` returns the
    codebook at code positions and the placed EOL/EOF elsewhere (transformers masks the rest)."""
    from emu3_train.generation import _vision_schedule

    schedule = _vision_schedule(vocab, h, w, 1)
    codes = list(range(vocab.vision_start, vocab.vision_start + vocab.codebook_size))

    def allowed(batch_id, input_ids):
        k = len(input_ids) - prompt_len
        item = schedule[k] if k < len(schedule) else vocab.eol  # the closing EOL: one more position
        return codes if item is None else [item]

    return schedule, allowed


def _hf_codes(tokens, schedule, vocab) -> torch.Tensor:
    return torch.tensor([[t - vocab.vision_start for t, item in zip(row, schedule) if item is None]
                         for row in tokens])


def cache_bytes(model, prompts, n, device) -> tuple[int, int]:
    """(bytes of the K/V buffers after a prefill + n steps, the formula's bytes)."""
    dec = Decoding(model, prompts, n, device=device)
    logits = dec.prefill()
    for _ in range(n):
        logits = dec.step(logits.argmax(-1))
    real = sum(t.numel() * t.element_size() for c in dec.cache.layers for t in (c.k, c.v))
    capacity = max(len(p) for p in prompts) + n  # the longest prompt plus every token fed after it
    head_dim, bytes_per = TINY["hidden_size"] // TINY["num_heads"], next(model.parameters()).element_size()
    formula = 2 * TINY["num_layers"] * len(prompts) * TINY["num_kv_heads"] * capacity * head_dim * bytes_per
    return real, formula


def emu3_8b_cache_gb(h: int = 90, w: int = 90, batch: int = 2, prompt: int = 64) -> float:
    """The formula for Emu3-8B (32 layers, 8 KV heads x 128, bf16) generating an h x w image."""
    positions = prompt + h * (w + 1) + 3
    return 2 * 32 * batch * 8 * positions * 128 * 2 / 1e9


def bench(name, vocab, h, w, batch, device, repeats, probes, hf_too=True) -> dict:
    tok = load_tokenizer(vocab)
    model = _model(vocab, device)
    prompts = [image_prompt(vocab, tok.encode, PROMPT, h, w)] * batch
    positions = h * (w + 1)  # schedule length: every code and EOL, the last code ends it
    n_gen = positions * batch
    greedy = Sampling(temperature=0.0)
    r = {"grid": [h, w], "batch": batch, "positions": positions, "prompt_tokens": len(prompts[0]),
         "vocab": vocab.size}
    hf = None
    if hf_too:
        folder = Path(tempfile.mkdtemp(prefix="bench_gen_")) / "hf"
        hf = _hf_model(model, ModelConfig(**TINY, vocab_size=vocab.size), vocab, folder, device)
    # transformers' min_new_tokens masks EOS until the length is reached: ours masks it too (same work)
    no_eos = torch.ones(vocab.size, dtype=torch.bool)
    no_eos[vocab.eos] = False
    best = {}
    outs = {}
    runs = {"cache": lambda: generate_vision(model, vocab, prompts, h, w, sampling=greedy, device=device),
            "ours_text": lambda: generate_text(model, vocab, prompts, positions, stop=[], allowed=no_eos,
                                               device=device)}
    if hf is not None:
        schedule, allowed = _grid_allowed(vocab, h, w, len(prompts[0]))
        runs["hf"] = lambda: _hf_generate(hf, prompts, positions, vocab, device)
        runs["hf_grid"] = lambda: _hf_generate(hf, prompts, positions, vocab, device, allowed)
    if name == "demo":  # warm-up: first calls allocate and pick kernels
        for fn in runs.values():
            fn()
    for _ in range(repeats):
        for side, fn in runs.items():
            t, out = _timed(fn, device)
            best[side] = min(best.get(side, float("inf")), t)
            outs[side] = out
    for side, t in best.items():
        r[f"{side}_tokens_per_s"] = n_gen / t
        r[f"{side}_s"] = t
    problems = []
    if hf is not None:
        r["tokens_equal_hf"] = outs["ours_text"] == outs["hf"]
        if not r["tokens_equal_hf"]:
            problems.append(f"{name}: our greedy tokens differ from transformers' generate")
        r["vs_hf"] = r["ours_text_tokens_per_s"] / r["hf_tokens_per_s"]
        r["grid_vs_hf"] = r["cache_tokens_per_s"] / r["hf_tokens_per_s"]
        r["grid_vs_hf_grid"] = r["cache_tokens_per_s"] / r["hf_grid_tokens_per_s"]
        r["codes_equal_hf_grid"] = torch.equal(_hf_codes(outs["hf_grid"], schedule, vocab),
                                               outs["cache"].view(batch, -1))
        if not r["codes_equal_hf_grid"]:
            problems.append(f"{name}: our greedy codes differ from transformers' grid-constrained generate")
    if probes == 0:  # every step, codes compared
        t, codes = _timed(lambda: no_cache_vision(model, vocab, prompts, h, w, device), device)
        r["no_cache_tokens_per_s"] = n_gen / t
        r["codes_equal_no_cache"] = torch.equal(codes, outs["cache"].view(batch, -1))
        if not r["codes_equal_no_cache"]:
            problems.append(f"{name}: cached codes differ from full recompute")
    else:  # step time at evenly spaced prefix lengths
        body = [vocab.vision_start] * positions
        times = []
        for k in range(probes):
            length = len(prompts[0]) + (k * positions) // probes + positions // (2 * probes)
            seqs = [list(prompts[0]) + body[:length - len(prompts[0])]] * batch
            times.append(min(_timed(lambda s=seqs: _no_cache_step(model, s, device), device)[0]
                             for _ in range(2)))
        r["no_cache_step_s"] = times
        r["no_cache_tokens_per_s"] = batch / (sum(times) / len(times))
        r["no_cache_estimated"] = True
    r["cache_speedup"] = r["cache_tokens_per_s"] / r["no_cache_tokens_per_s"]
    real, formula = cache_bytes(model, prompts[:batch], positions, device)
    r["cache_bytes"], r["cache_formula_bytes"] = real, formula
    return r, problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch at the demo size")
    p.add_argument("--batch64", type=int, default=1, help="sequences per batch at the 64x64 grid")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side at the demo size")
    p.add_argument("--repeats64", type=int, default=1, help="timed runs per side at the 64x64 grid")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for every side (default 1: on a shared 2-core machine two OpenMP "
                        "threads spin on each other and run ~10x slower)")
    p.add_argument("--probes", type=int, default=8, help="prefix lengths timed for the 64x64 baseline")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks only, seconds")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    summary, problems = {"device": str(device), "threads": torch.get_num_threads(), "model": TINY}, []
    demo, emu3 = get_vocab("demo"), get_vocab("emu3")
    cases = [("demo", demo, 8, 8, args.batch, 0, args.repeats),
             ("grid64", emu3, 64, 64, args.batch64, args.probes, args.repeats64)]
    if args.smoke:
        cases = [("demo", demo, 3, 4, 2, 0, 1), ("grid64", demo, 6, 6, 1, 2, 1)]
    for name, vocab, h, w, b, probes, repeats in cases:
        r, bad = bench(name, vocab, h, w, b, device, repeats, probes)
        summary[name], problems = r, problems + bad
        print(f"{name}: {h}x{w} grid, batch {b}, vocab {vocab.size:,}: cache "
              f"{r['cache_tokens_per_s']:,.0f} tok/s "
              f"vs no cache {r['no_cache_tokens_per_s']:,.1f}{' (estimated)' if probes else ''} "
              f"({r['cache_speedup']:.1f}x); ours without the grid {r['ours_text_tokens_per_s']:,.0f} vs HF "
              f"generate {r['hf_tokens_per_s']:,.0f} tok/s ({r['vs_hf']:.2f}x, tokens equal: "
              f"{r['tokens_equal_hf']}); grid vs HF {r['grid_vs_hf']:.2f}x, vs HF constrained to the grid "
              f"{r['hf_grid_tokens_per_s']:,.0f} tok/s {r['grid_vs_hf_grid']:.2f}x (codes equal: "
              f"{r['codes_equal_hf_grid']}); cache {r['cache_bytes']:,} B vs "
              f"formula {r['cache_formula_bytes']:,} B", flush=True)
    summary["emu3_8b_720_cfg_cache_gb"] = emu3_8b_cache_gb()
    print(f"Emu3-8B, 720x720 (90x90 codes) with guidance (batch 2), bf16: KV cache "
          f"{summary['emu3_8b_720_cfg_cache_gb']:.2f} GB by the formula")
    print(json.dumps(summary))
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
