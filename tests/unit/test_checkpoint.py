"""Checkpoints round-trip model, optimizer, scheduler and loader state; ``latest`` moves last."""

import json
from dataclasses import replace

import pytest
import torch

from emu3_train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from emu3_train.config import ModelConfig, OptimConfig
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.optim import build_optimizer, build_scheduler
from emu3_train.weights import WeightsMismatchError

CFG = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)


def _setup(seed):
    torch.manual_seed(seed)
    model = Emu3CausalLM(CFG, 50)
    opt = build_optimizer(model, OptimConfig())
    return model, opt, build_scheduler(opt, OptimConfig(warmup_steps=2), 10)


def _step(model, opt, sched):
    tokens = torch.randint(0, 50, (1, 6))
    pos = torch.arange(6)[None]
    hidden = model(tokens, pos, torch.tensor([0, 6], dtype=torch.int32))
    model.logits(hidden).square().mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_round_trip(tmp_path):
    model, opt, sched = _setup(0)
    for _ in range(3):
        _step(model, opt, sched)
    path = save_checkpoint(tmp_path, 3, model, opt, sched, {"epoch": 0, "cursor": 24}, {"x": 1}, 99)
    assert path.name == "step_000003" and (tmp_path / "latest").read_text().strip() == "step_000003"
    assert not list(tmp_path.glob(".tmp*"))
    meta_json = json.loads((path / "meta.json").read_text())
    assert meta_json["tokens_seen"] == 99 and meta_json["config"] == {"x": 1}
    assert "torch" in meta_json["versions"] and "git_sha" in meta_json
    assert (path / "rng" / "rank_00000.pt").is_file()

    model2, opt2, sched2 = _setup(1)
    meta = load_checkpoint(tmp_path, model2, opt2, sched2)
    assert meta["loader"] == {"epoch": 0, "cursor": 24} and meta["step"] == 3
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)
    assert sched2.last_epoch == sched.last_epoch == 3
    # the next step is identical
    torch.manual_seed(5)
    _step(model, opt, sched)
    torch.manual_seed(5)
    _step(model2, opt2, sched2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_init_from_loads_weights_only_and_latest_moves(tmp_path):
    model, opt, sched = _setup(0)
    save_checkpoint(tmp_path, 1, model, opt, sched, {}, {}, 0)
    _step(model, opt, sched)
    save_checkpoint(tmp_path, 2, model, opt, sched, {}, {}, 0)
    assert resolve_checkpoint(tmp_path).name == "step_000002"
    fresh = Emu3CausalLM(CFG, 50)
    load_weights(tmp_path / "latest", fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_incomplete_or_mismatched_checkpoint_fails(tmp_path):
    (tmp_path / "step_000001").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_checkpoint(tmp_path / "step_000001")
    model, opt, sched = _setup(0)
    save_checkpoint(tmp_path, 2, model, opt, sched, {}, {}, 0)
    with pytest.raises(WeightsMismatchError) as e:
        load_weights(tmp_path, Emu3CausalLM(CFG, 60))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'step_000002'}: ")
    assert ("tensor 'model.model.embed_tokens.weight' has shape [50, 32] in the checkpoint but [60, 32] "
            "in this model (2 of another shape)") in message  # the embedding and the head
    assert "missing" not in message and "unexpected" not in message


def _save_layers(ckpt_dir, num_layers, optimizer=None):
    torch.manual_seed(0)
    model = Emu3CausalLM(replace(CFG, num_layers=num_layers), 50)
    opt = (optimizer or build_optimizer)(model, OptimConfig())
    save_checkpoint(ckpt_dir, 1, model, opt, build_scheduler(opt, OptimConfig(), 10), {}, {}, 0)
    return model


def test_checkpoint_with_more_layers_than_the_model_fails(tmp_path):
    """DCP reads only the keys it is asked for: the extra layers used to be dropped silently."""
    _save_layers(tmp_path, 4)
    model, opt, sched = _setup(1)  # 2 layers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for load in (lambda: load_weights(tmp_path, model), lambda: load_checkpoint(tmp_path, model, opt, sched)):
        with pytest.raises(WeightsMismatchError) as e:
            load()
        message = str(e.value)
        assert "\n" not in message
        assert "has tensor 'model.model.layers.2.input_layernorm.weight' that this model lacks" in message
        assert "(18 unexpected)" in message  # 9 tensors in each of layers 2 and 3
        assert "the checkpoint has 4 layers, this model 2: set model.num_layers=4" in message
        assert "missing" not in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was read


def test_checkpoint_with_fewer_layers_than_the_model_fails(tmp_path):
    _save_layers(tmp_path, 2)
    model = Emu3CausalLM(replace(CFG, num_layers=4), 50)
    with pytest.raises(WeightsMismatchError) as e:
        load_weights(tmp_path, model)
    message = str(e.value)
    q_proj = "model.model.layers.2.self_attn.q_proj.weight"
    assert f"the checkpoint has no tensor {q_proj!r} (18 missing)" in message
    assert "set model.num_layers=2" in message and "unexpected" not in message
    opt = build_optimizer(model, OptimConfig())
    with pytest.raises(WeightsMismatchError, match=f"no tensor {q_proj!r}"):
        load_checkpoint(tmp_path, model, opt, build_scheduler(opt, OptimConfig(), 10))


def test_resume_checks_the_optimizer_state_of_every_parameter(tmp_path):
    """Same model, another optimizer: AdamW's moments are missing, SGD's momentum is unexpected."""
    sgd = lambda model, _: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _save_layers(tmp_path, 2, optimizer=sgd)
    model, opt, sched = _setup(1)
    load_weights(tmp_path, model)  # the weights alone fit
    with pytest.raises(WeightsMismatchError) as e:
        load_checkpoint(tmp_path, model, opt, sched)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'step_000001'}: does not fit this optimizer: ")
    assert "the checkpoint has no tensor 'optim.state.model.embed_tokens.weight.step'" in message
    assert "has tensor 'optim.state.lm_head.weight.momentum_buffer' that this optimizer lacks" in message
    assert "(21 unexpected)" in message and "num_layers" not in message  # same layer count
