"""KV-cached generation under tensor parallelism (2 gloo processes, heads sharded, each rank caching
its own KV heads) equals one process: logits at every step within 1e-5 (fp32), and the same
guided codes and greedy captions, with sequence parallelism (padded steps) and without.

    .venv/bin/python -m pytest -q tests/distributed/test_generation_parallel.py
"""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from torch.distributed.device_mesh import init_device_mesh

from emu3_train.config import ModelConfig
from emu3_train.generation import Decoding, Sampling, generate_vision, image_prompt
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.parallel.tensor_parallel import apply_tp
from emu3_train.sampling import caption_images
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

V = get_vocab("demo")  # 283 ids: uneven over tp=2
TOK = load_tokenizer(V)
CFG = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  rope_theta=10_000.0)
PROMPTS = [image_prompt(V, TOK.encode, c, 3, 3) for c in ("a handwritten digit three", "seven")]
NEGATIVE = [image_prompt(V, TOK.encode, "", 3, 3)] * 2
FED = [V.vision_start + 3, V.vision_start + 1, V.eol, V.vision_start + 16]
IMAGES = torch.arange(18).view(2, 3, 3) % V.codebook_size


def fresh_model() -> Emu3CausalLM:
    torch.manual_seed(0)
    return Emu3CausalLM(CFG, V.size).eval()


@torch.no_grad()
def generate(model, sync=None, multiple=1):
    dec = Decoding(model, [*PROMPTS, *NEGATIVE], len(FED), length_multiple=multiple)
    logits = [dec.prefill()]
    for t in FED:
        logits.append(dec.step(torch.full((4,), t)))
    sampling = Sampling(temperature=1.0, top_k=8, guidance_scale=3.0)
    codes = generate_vision(model, V, PROMPTS, 3, 3, sampling=sampling, negative=NEGATIVE, seed=4,
                            sync=sync, length_multiple=multiple)
    captions = caption_images(model, V, TOK.encode, IMAGES, max_new_tokens=6, sync=sync,
                              length_multiple=multiple)
    return torch.stack(logits), codes, captions


def _tp_worker(rank, world, sequence_parallel):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    model = fresh_model()
    apply_tp(model, mesh["tp"], sequence_parallel=sequence_parallel)

    def sync(t):
        dist.broadcast(t, src=0)
        return t

    return generate(model, sync, multiple=world if sequence_parallel else 1)


@pytest.mark.parametrize("sequence_parallel", [True, False], ids=["tp2_sp", "tp2"])
def test_tp_generation_equals_one_process(sequence_parallel):
    logits, codes, captions = generate(fresh_model())
    for got_logits, got_codes, got_captions in run_distributed(_tp_worker, 2, (sequence_parallel,)):
        torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(got_codes, codes) and got_captions == captions
