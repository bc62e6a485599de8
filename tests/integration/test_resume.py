"""Exact resume, background saves, retention, and falling back from a torn checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from emu3_train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    TrainState,
    load_weights,
    resolve_checkpoint,
    training_state,
)
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.recipes import compose
from emu3_train.trainer import Trainer

BASE = ["experiment=demo", "wandb.mode=disabled", "eval.task=none", "data.seq_len=256",
        "model.num_layers=2", "model.attention_dropout=0.1", "trainer.max_steps=6",
        "optim.warmup_steps=2"]


def _trainer(demo_data, run_dir, *overrides):
    cfg = compose([*BASE, f"data.path={demo_data / 'train'}", *overrides])
    t = Trainer(cfg, run_dir)
    t.setup()
    return t


def test_resume_continues_bitwise(demo_data, tmp_path):
    full = _trainer(demo_data, tmp_path / "a")
    expected = [full.train_step()["train/loss"] for _ in range(6)]

    first = _trainer(demo_data, tmp_path / "b")
    got = [first.train_step()["train/loss"] for _ in range(3)]
    first.save(wait=True)
    resumed = _trainer(demo_data, tmp_path / "b", "checkpoint.resume=latest")
    assert resumed.step == 3 and resumed.loader.state_dict() == first.loader.state_dict()
    got += [resumed.train_step()["train/loss"] for _ in range(3)]
    assert got == expected  # bitwise, dropout included
    assert resumed.loader.state_dict() == full.loader.state_dict()  # same rows consumed
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_background_save_holds_the_state_of_its_step(demo_data, tmp_path):
    t = _trainer(demo_data, tmp_path, "checkpoint.async_save=true")
    t.train_step()
    snapshot = [p.detach().clone() for p in t.model.parameters()]
    path = t.save()
    for _ in range(2):  # keep training while the shards are written
        t.train_step()
    t.checkpoints.wait()
    fresh = _trainer(demo_data, tmp_path / "other")
    load_weights(path, fresh.model)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, fresh.model.parameters()))


def test_retention_keeps_last_k_and_every_m(demo_data, tmp_path):
    t = _trainer(demo_data, tmp_path)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2, keep_every=4)
    for step in range(1, 9):
        manager.save(training_state(t.model, t.optimizer, t.scheduler, {}, TrainState(step)), {})
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("step_*"))
    assert kept == ["step_000004", "step_000007", "step_000008"]


def test_truncated_shard_falls_back_with_warning(demo_data, tmp_path):
    t = _trainer(demo_data, tmp_path)
    manager = CheckpointManager(tmp_path / "ckpt")
    for step in (1, 2):
        t.train_step()
        manager.save(training_state(t.model, t.optimizer, t.scheduler, {}, TrainState(step)), {})
    shard = next((tmp_path / "ckpt" / "step_000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated"):
        resolve_checkpoint(tmp_path / "ckpt" / "step_000002")
    with pytest.warns(UserWarning, match="truncated"):
        assert resolve_checkpoint(tmp_path / "ckpt").name == "step_000001"


def test_loss_spike_is_reported(demo_data, tmp_path, capsys):
    t = _trainer(demo_data, tmp_path, "trainer.spike_factor=2.0")
    for loss in (1.0, 1.1, 0.9, 5.0):  # the losses of a logging window, checked when it is read
        t.window.add({"train/loss": torch.tensor(loss), "train/loss_text": torch.tensor(loss),
                      "train/loss_vision": torch.tensor(loss), "train/grad_norm": torch.tensor(1.0),
                      "finite": torch.tensor(True), "stop": torch.tensor(0.0)}, {"step": 1})
    t.read_window()
    assert "loss spike 5.0000 > 2.0 x running mean" in capsys.readouterr().out


def test_resume_with_another_worker_count(demo_data, tmp_path):
    """Reader threads are not part of the state: 1 worker saved, 0 workers resumed, same stream."""
    full = _trainer(demo_data, tmp_path / "a", "data.num_workers=1")
    expected = [full.train_step()["train/loss"] for _ in range(4)]
    first = _trainer(demo_data, tmp_path / "b", "data.num_workers=1")
    got = [first.train_step()["train/loss"] for _ in range(2)]
    first.save(wait=True)
    first.loader.close()
    resumed = _trainer(demo_data, tmp_path / "b", "data.num_workers=0", "checkpoint.resume=latest")
    got += [resumed.train_step()["train/loss"] for _ in range(2)]
    assert got == expected
    assert resumed.loader.state_dict() == full.loader.state_dict()
    full.loader.close()


def test_requeued_stage2_job_resumes_instead_of_reinitialising(demo_data, tmp_path):
    """init_from starts a run; once the run has its own checkpoint, resume=latest wins (a requeued
    slurm job passes both)."""
    stage1 = _trainer(demo_data, tmp_path / "s1")
    stage1.train_step()
    init = stage1.save(wait=True)
    both = ("checkpoint.resume=latest", f"checkpoint.init_from={init}")
    fresh = _trainer(demo_data, tmp_path / "s2", *both)
    assert fresh.step == 0
    for p, q in zip(stage1.model.parameters(), fresh.model.parameters()):
        assert torch.equal(p, q)  # started from the stage-1 weights
    fresh.train_step()
    fresh.train_step()
    fresh.save(wait=True)
    requeued = _trainer(demo_data, tmp_path / "s2", *both)
    assert requeued.step == 2
    for p, q in zip(fresh.model.parameters(), requeued.model.parameters()):
        assert torch.equal(p, q)



def test_init_from_an_exported_hf_folder(demo_data, tmp_path):
    """checkpoint.init_from=HF_DIR (an fp32 export, no import step): the run starts from the
    folder's weights bit for bit, at step 0, and trains."""
    from emu3_train.interop.hf import export_hf

    stage1 = _trainer(demo_data, tmp_path / "s1")
    stage1.train_step()
    stage1.save(wait=True)
    hf = export_hf(tmp_path / "s1" / "ckpt", tmp_path / "hf")
    stored = load_file(hf / "model.safetensors")
    started = _trainer(demo_data, tmp_path / "s2", f"checkpoint.init_from={hf}")
    params = dict(started.model.named_parameters())
    assert started.step == 0 and params.keys() == stored.keys()
    for name, p in params.items():
        assert stored[name].dtype == torch.float32 and torch.equal(p.detach(), stored[name]), name
    for p, q in zip(stage1.model.parameters(), started.model.parameters()):
        assert torch.equal(p, q)
    assert torch.isfinite(torch.tensor(started.train_step()["train/loss"]))


@pytest.mark.slow
def test_cli_trains_from_an_hf_folder_and_rejects_another_depth(demo_data, tmp_path, run_train):
    from emu3_train.interop.hf import save_hf
    from emu3_train.vocab import get_vocab

    cfg = compose([*BASE, "data.path=unused"])
    vocab = get_vocab(cfg.data.vocab)
    special = {"pad_token_id": vocab.pad, "bos_token_id": vocab.bos, "eos_token_id": vocab.eos}
    hf = save_hf(Emu3CausalLM(cfg.model, vocab.size), cfg.model, tmp_path / "hf", special)
    fast = ["experiment=demo", "trainer.max_steps=1", "wandb.mode=disabled", "eval.task=none",
            "data.seq_len=256", "data.micro_batch_size=1", "data.global_batch_size=1", "model.num_layers=2",
            f"data.path={demo_data / 'train'}", f"checkpoint.init_from={hf}"]
    proc = run_train(*fast)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_train(*fast, "model.num_layers=3")
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: {hf / 'config.json'}: describes another model")
    assert "num_hidden_layers=2 but model.num_layers=3" in errors[0] and "set model.num_layers=2" in errors[0]
