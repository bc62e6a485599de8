"""DPO training steps on gloo equal one process (dp2, tp2, cp2), and resume mid-DPO is exact.

Pair shards: random t2i pairs (same caption, two random digits-sized images, loss_spans over the
vision block, random reference log-probs), written with the shard writer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from harness import run_distributed

from emu3_train.layout import t2i_document
from emu3_train.recipes import compose
from emu3_train.tokenizer import load_tokenizer
from emu3_train.trainer import Trainer
from emu3_train.vocab import get_vocab

BASE = ["experiment=demo_dpo", "wandb.mode=disabled", "checkpoint.init_from=null",
        "checkpoint.init_required=false", "data.seq_len=256", "model.num_layers=2", "model.hidden_size=64",
        "model.intermediate_size=128", "data.global_batch_size=4", "optim.warmup_steps=1",
        "optim.lr=1e-3", "trainer.max_steps=6", "checkpoint.async_save=false", "data.num_workers=0"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from emu3_train.data_pipelines.write_shards import write_shards

    vocab = get_vocab("demo")
    encode = load_tokenizer(vocab).encode
    rng = np.random.default_rng(0)
    docs = []
    for p in range(40):
        caption = encode(f"a handwritten digit {p % 10}")
        for role in ("chosen", "rejected"):
            tokens = t2i_document(vocab, caption, rng.integers(0, vocab.codebook_size, (8, 8)), encode)
            sot = tokens.index(vocab.sot)
            docs.append({"tokens": tokens, "task": "t2i", "source": "pairs", "pair": f"p{p}", "role": role,
                         "loss_spans": [[sot + 1, len(tokens) - 1]],
                         "ref_logp": float(-rng.uniform(150, 200))})
    out = tmp_path_factory.mktemp("pairs")
    write_shards(docs, out, vocab, max_count=20)
    return out


def _run(rank, world, data, run_dir, overrides, steps):
    cfg = compose([*BASE, f"data.path={data}", *overrides])
    t = Trainer(cfg, run_dir, rank, world)
    t.setup()
    out = [t.train_step() for _ in range(steps)]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(t.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return ([m["train/loss"] for m in out], [m["dpo/accuracy"] for m in out],
            {k: v.clone() for k, v in full.items()} if rank == 0 else None)


def _close(ref, got, param_atol, loss_rel=1e-6):
    assert got[0] == pytest.approx(ref[0], rel=loss_rel)
    assert got[1] == pytest.approx(ref[1], abs=1e-9)
    for name, value in ref[2].items():
        torch.testing.assert_close(got[2][name], value, rtol=0, atol=param_atol, msg=name)


# The CP core moves attention outputs by ~1 ulp (test_trainer_parallel); a document's log-prob sums
# ~75 targets' CE, so the DPO loss differs by ~1e-6 relative there: 1e-5 for cp2.
@pytest.mark.parametrize("layout, atol, loss_rel", [
    (["parallel.dp=2", "data.micro_batch_size=2"], 1e-5, 1e-6),
    (["parallel.dp=1", "parallel.tp=2", "data.micro_batch_size=4"], 1e-4, 1e-6),  # AdamW tolerance, as NTP
    pytest.param(["parallel.dp=1", "parallel.cp=2", "data.micro_batch_size=4"], 1e-4, 1e-5,
                 marks=pytest.mark.slow),
], ids=["dp2", "tp2", "cp2"])
def test_dpo_layouts_equal_one_process(pairs, tmp_path, layout, atol, loss_rel):
    ref = _run(0, 1, pairs, tmp_path / "one", ["data.micro_batch_size=4"], 3)
    assert all(np.isfinite(ref[0]))
    got = run_distributed(_run, 2, (pairs, tmp_path / "two", layout, 3))
    _close(ref, got[0], atol, loss_rel)


def test_resume_mid_dpo_is_exact(pairs, tmp_path):
    straight = Trainer(compose([*BASE, f"data.path={pairs}", "data.micro_batch_size=4"]), tmp_path / "a")
    straight.setup()
    want = [straight.train_step()["train/loss"] for _ in range(4)]
    first = Trainer(compose([*BASE, f"data.path={pairs}", "data.micro_batch_size=4"]), tmp_path / "b")
    first.setup()
    got = [first.train_step()["train/loss"] for _ in range(2)]
    first.save(wait=True)
    first.loader.close()
    again = Trainer(compose([*BASE, f"data.path={pairs}", "data.micro_batch_size=4",
                             "checkpoint.resume=latest"]), tmp_path / "b")
    again.setup()
    got += [again.train_step()["train/loss"] for _ in range(2)]
    assert got == want  # bitwise: same weights, optimizer, schedule and pair stream
    for (name, a), b in zip(straight.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
