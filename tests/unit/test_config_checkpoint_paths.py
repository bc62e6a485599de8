"""``checkpoint.init_from`` / ``checkpoint.resume`` paths are checked before any model is built: a
missing path, a Hugging Face folder our decoder cannot load (any, to resume), an unfinished or
incomplete save each give one line saying what the path is and what to do (ConfigError), instead of a
traceback at load time; an Emu3 HF folder is a valid ``init_from``."""

from __future__ import annotations

import pytest
import torch

from emu3_train.checkpoint import is_hf_folder, save_checkpoint
from emu3_train.checkpoint_paths import check_checkpoint_path
from emu3_train.config import (
    CheckpointConfig,
    ConfigError,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    check_checkpoint_paths,
)
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.optim import build_optimizer, build_scheduler


def _save(ckpt_dir, step=1):
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, OptimConfig())
    return save_checkpoint(ckpt_dir, step, model, opt, build_scheduler(opt, OptimConfig(), 10), {}, {}, 0)


def _hf_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_complete_checkpoints_pass(tmp_path):
    step = _save(tmp_path / "ckpt")
    for path in (step, tmp_path / "ckpt", tmp_path / "ckpt" / "latest"):
        check_checkpoint_path(path, "checkpoint.init_from")
        check_checkpoint_path(str(path), "checkpoint.resume")


@pytest.mark.parametrize("field,hint", [("checkpoint.init_from", "make pretrain-stage1"),
                                        ("checkpoint.resume", "checkpoint.resume=latest")])
def test_missing_path(tmp_path, field, hint):
    with pytest.raises(ConfigError) as e:
        check_checkpoint_path(tmp_path / "nowhere", field)
    message = _one_line(e)
    assert message.startswith(f"{field}={tmp_path / 'nowhere'}: does not exist") and hint in message


def test_missing_stage1_checkpoint_says_run_stage1_first(tmp_path):
    with pytest.raises(ConfigError) as e:
        check_checkpoint_path(tmp_path / "runs/demo-stage1/ckpt/latest", "checkpoint.init_from")
    message = _one_line(e)
    assert "run `make pretrain-stage1` first or pass INIT=" in message


def _exported(path, shards=1):
    """A folder as `python -m emu3_train.interop.hf export` writes it (``shards`` > 1: indexed)."""
    from emu3_train.interop.hf import save_hf

    cfg = ModelConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return save_hf(Emu3CausalLM(cfg, 40), cfg, path, special, max_shard_gb=4e-6 if shards > 1 else 5)


def test_hf_folder(tmp_path):
    hf = _exported(tmp_path / "hf")
    assert is_hf_folder(hf) and not is_hf_folder(tmp_path) and not is_hf_folder(tmp_path / "none")
    check_checkpoint_path(hf, "checkpoint.init_from")  # loaded directly, no import step
    with pytest.raises(ConfigError) as e:
        check_checkpoint_path(hf, "checkpoint.resume")
    message = _one_line(e)
    assert "Hugging Face" in message and "no optimizer" in message and f"checkpoint.init_from={hf}" in message


def test_hf_folder_the_decoder_cannot_load(tmp_path):
    bad = _hf_folder(tmp_path / "bad")  # config.json without a model_type
    with pytest.raises(ConfigError) as e:
        check_checkpoint_path(bad, "checkpoint.init_from")
    message = _one_line(e)
    assert message.startswith(f"checkpoint.init_from={bad}: a Hugging Face model folder this decoder cannot")
    assert str(bad / "config.json") in message and "not an Emu3 model" in message

    sharded = _exported(tmp_path / "sharded", shards=2)
    check_checkpoint_path(sharded, "checkpoint.init_from")
    lost = sorted(sharded.glob("model-*.safetensors"))[-1]
    lost.unlink()
    with pytest.raises(ConfigError) as e:
        check_checkpoint_path(sharded, "checkpoint.init_from")
    assert f"{lost}: missing (listed in model.safetensors.index.json)" in _one_line(e)


def test_unfinished_save(tmp_path):
    tmp = tmp_path / "ckpt" / ".tmp_step_000004"
    (tmp / "rng").mkdir(parents=True)
    (tmp / "meta.json").write_text("{}")
    with pytest.raises(ConfigError) as e:
        check_checkpoint_path(tmp, "checkpoint.init_from")
    message = _one_line(e)
    assert "unfinished save" in message and str(tmp_path / "ckpt") in message


def test_step_dir_without_metadata(tmp_path):
    step = _save(tmp_path / "ckpt")
    (step / ".metadata").unlink()
    with pytest.raises(ConfigError) as e:
        check_checkpoint_path(step, "checkpoint.resume")
    assert "incomplete checkpoint" in _one_line(e)
    with pytest.raises(ConfigError) as e:  # the ckpt dir has nothing complete to fall back to
        check_checkpoint_path(tmp_path / "ckpt", "checkpoint.init_from")
    assert "no complete checkpoint" in _one_line(e)
    _save(tmp_path / "ckpt", step=2)  # a complete newer one: the ckpt dir is usable again
    check_checkpoint_path(tmp_path / "ckpt", "checkpoint.init_from")


def test_empty_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="not a checkpoint"):
        check_checkpoint_path(tmp_path, "checkpoint.init_from")


def test_weights_only_checkpoint_cannot_be_resumed(tmp_path):
    import json

    step = _save(tmp_path / "ckpt")
    meta = json.loads((step / "meta.json").read_text())
    (step / "meta.json").write_text(json.dumps({**meta, "weights_only": True}))
    check_checkpoint_path(step, "checkpoint.init_from")
    with pytest.raises(ConfigError, match="weights-only.*checkpoint.init_from"):
        check_checkpoint_path(step, "checkpoint.resume")


def test_config_checks_what_the_trainer_will_load(tmp_path):
    run = tmp_path / "run"
    missing = str(tmp_path / "nowhere")
    cfg = TrainConfig(checkpoint=CheckpointConfig(init_from=missing))
    with pytest.raises(ConfigError, match="checkpoint.init_from"):
        check_checkpoint_paths(cfg, run)
    cfg.checkpoint.resume = "latest"  # nothing saved yet: a fresh start from init_from
    with pytest.raises(ConfigError, match="checkpoint.init_from"):
        check_checkpoint_paths(cfg, run)
    _save(run / "ckpt")  # a requeued job resumes its own checkpoint; init_from is not read
    check_checkpoint_paths(cfg, run)
    cfg.checkpoint.resume = missing
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        check_checkpoint_paths(cfg, run)
    check_checkpoint_paths(TrainConfig(), run)  # neither set
