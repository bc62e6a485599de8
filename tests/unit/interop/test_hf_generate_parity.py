"""Greedy decoding of an exported HF folder gives exactly transformers' own greedy ``generate`` on
that folder (its own KV cache): text through the CLI (``--text --temperature 0``, left-padded
batch), and a code grid through the engine against ``generate`` with a
``prefix_allowed_tokens_fn`` that enforces the same grid (Emu3's own way of constraining it).

    .venv/bin/python -m pytest -q tests/unit/interop/test_hf_generate_parity.py
"""

from __future__ import annotations

import json

import pytest
import torch

from emu3_train.config import ModelConfig
from emu3_train.generate import main
from emu3_train.generation import Sampling, _vision_schedule, generate_vision, image_prompt
from emu3_train.interop.hf import save_hf
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.model_source import load_model
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

transformers = pytest.importorskip("transformers")
V = get_vocab("demo")
TOK = load_tokenizer(V)
PROMPTS = ["a handwritten digit", "seven"]  # different lengths: the batch is left-padded


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny model (weights large enough that attention and RoPE matter) exported by interop.hf."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      rope_theta=10_000.0, max_position_embeddings=256, vocab_size=V.size)
    model = Emu3CausalLM(cfg, V.size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.15)
    path = tmp_path_factory.mktemp("parity") / "hf"
    save_hf(model, cfg, path, {"pad_token_id": V.pad, "bos_token_id": V.bos, "eos_token_id": V.eos})
    return path


def _hf(path):
    return transformers.Emu3ForCausalLM.from_pretrained(path).eval()


@torch.no_grad()
def _hf_greedy(model, prompts, new, **kw) -> list[list[int]]:
    """transformers' greedy generate on a left-padded batch; tokens after each prompt, EOS cut."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), V.pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         pad_token_id=V.pad, **kw)[:, width:].tolist()
    return [row[:row.index(V.eos)] if V.eos in row else row for row in out]


def test_cli_greedy_text_is_transformers_greedy_generate(hf_dir, tmp_path):
    assert main([str(hf_dir), "--text", *[a for p in PROMPTS for a in ("--prompt", p)], "--temperature", "0",
                 "--max-new-tokens", "24", "--out", str(tmp_path / "o")]) == 0
    ours = [item["tokens"] for item in json.loads((tmp_path / "o" / "codes.json").read_text())]
    seqs = [[V.bos, *TOK.encode(p)] for p in PROMPTS]
    reference = _hf(hf_dir)
    assert ours == [_hf_greedy(reference, [s], 24)[0] for s in seqs]  # one at a time
    assert ours == _hf_greedy(reference, seqs, 24)  # and as one left-padded batch
    assert any(len(t) >= 8 for t in ours)  # not a trivial immediate EOS


def test_greedy_grid_is_transformers_generate_constrained_to_the_grid(hf_dir):
    h, w = 3, 4
    lo, hi = V.vision_start, V.vision_start + V.codebook_size
    schedule = _vision_schedule(V, h, w, 1)
    prompts = [image_prompt(V, TOK.encode, p, h, w) for p in PROMPTS]
    src = load_model(hf_dir)
    ours = generate_vision(src.model, V, prompts, h, w, sampling=Sampling(temperature=0.0))

    width = max(len(p) for p in prompts)

    def allowed(batch_id, input_ids):
        item = schedule[len(input_ids) - width]
        return list(range(lo, hi)) if item is None else [item]

    got = _hf_greedy(_hf(hf_dir), prompts, len(schedule), prefix_allowed_tokens_fn=allowed)
    codes = torch.tensor([[t - lo for t, item in zip(row, schedule) if item is None] for row in got])
    assert torch.equal(ours.view(len(prompts), -1), codes)
    assert len(set(codes.flatten().tolist())) > 1
