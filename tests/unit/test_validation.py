"""Validation on held-out rows (emu3_train.validation): a fixed row set, numbers equal to a naive
per-token CE, per-source losses, the console line; the offline CLI and model_source loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from emu3_train.data.batch import IGNORE_INDEX
from emu3_train.model_source import ModelSourceError, load_model
from emu3_train.parallel.step_plan import StepPlan
from emu3_train.recipes import compose
from emu3_train.step import StepContext
from emu3_train.trainer import Trainer
from emu3_train.validation import Validator, format_validation, main
from emu3_train.vocab import get_vocab

TINY = ["experiment=demo", "wandb.mode=disabled", "eval.task=none", "data.seq_len=256", "data.num_workers=0",
        "model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128", "optim.warmup_steps=1",
        "checkpoint.async_save=false", "trainer.sample_interval=0"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from emu3_train.data_pipelines.demo import build_demo

    out = tmp_path_factory.mktemp("demo")
    build_demo(out)
    return out


def _model(seed=0):
    from emu3_train.config import ModelConfig
    from emu3_train.model.decoder import Emu3CausalLM

    torch.manual_seed(seed)
    cfg = ModelConfig(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    return Emu3CausalLM(cfg, get_vocab("demo").size).eval()


def _naive(model, validator, vocab, sources=None):
    """Σ w·CE / Σ w with full logits, per token, over the validator's rows (one batch per row)."""
    num = den = 0.0
    by_class = {"text": [0.0, 0], "vision": [0.0, 0]}
    for row in validator.rows:
        b = validator.loader.batch_of([row])
        with torch.no_grad():
            logits = model.logits(model(b["tokens"], b["position_ids"], b["cu_seqlens"]))[0]
        src = validator._source_of([row])[0]
        for t in range(logits.shape[0]):
            label, w = int(b["labels"][0, t]), float(b["loss_weight"][0, t])
            if label == IGNORE_INDEX or w == 0 or (sources is not None and int(src[t]) not in sources):
                continue
            ce = float(torch.nn.functional.cross_entropy(logits[t], torch.tensor(label)))
            num, den = num + w * ce, den + w
            c = by_class["vision" if label >= vocab.vision_start else "text"]
            c[0], c[1] = c[0] + ce, c[1] + 1
    return num / den, by_class["text"][0] / by_class["text"][1], by_class["vision"][0] / by_class["vision"][1]


def test_validation_equals_a_naive_per_token_ce(demo):
    vocab, model = get_vocab("demo"), _model()
    ctx = StepContext(bf16=False, vision_start=vocab.vision_start, impl="reference")
    validator = Validator(demo / "eval", [], vocab, seq_len=256, rows=5, micro_batch_size=2)
    got = validator(model, StepPlan(device=torch.device("cpu")), ctx)
    loss, text, vision = _naive(model, validator, vocab)
    assert got["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert got["val/loss_text"] == pytest.approx(text, rel=1e-5)
    assert got["val/loss_vision"] == pytest.approx(vision, rel=1e-5)
    assert got["val/eval/loss"] == got["val/loss"]
    assert not model.training  # left as it was

    # the same rows whatever the micro-batch and the dp rank that evaluates them
    again = Validator(demo / "eval", [], vocab, seq_len=256, rows=5, micro_batch_size=3)
    assert again.rows == validator.rows
    cpu = StepPlan(device=torch.device("cpu"))
    assert again(model, cpu, ctx)["val/loss"] == pytest.approx(got["val/loss"], rel=1e-6)
    ranks = [Validator(demo / "eval", [], vocab, seq_len=256, rows=5, micro_batch_size=2, dp_rank=r,
                       dp_size=2) for r in range(2)]
    assert [len(v.batches_rows) for v in ranks] == [2, 2]  # rank 1 pads with an empty row
    held = [row for v in ranks for rows in v.batches_rows for row in rows if row]
    assert sorted(map(str, held)) == sorted(map(str, validator.rows))


def test_per_source_losses_of_a_blend(demo, tmp_path):
    vocab, model = get_vocab("demo"), _model(1)
    root = tmp_path / "val"
    shutil.copytree(demo / "eval", root / "digits")
    shutil.copytree(demo / "train", root / "more")
    ctx = StepContext(bf16=False, vision_start=vocab.vision_start, impl="reference")
    validator = Validator(root, ["0.5:digits", "0.5:more"], vocab, seq_len=256, rows=6)
    assert validator.names == ["digits", "more"]
    got = validator(model, StepPlan(device=torch.device("cpu")), ctx)
    for s, name in enumerate(validator.names):
        assert got[f"val/{name}/loss"] == pytest.approx(_naive(model, validator, vocab, {s})[0], rel=1e-5)
    assert got["val/loss"] == pytest.approx(_naive(model, validator, vocab)[0], rel=1e-5)
    line = format_validation(7, got, validator.names)
    assert line.startswith("val step 7 | loss ") and " | text " in line and " | vision " in line
    assert line.endswith(f" | more {got['val/more/loss']:.4f}") and "\n" not in line


def test_offline_numbers_equal_the_in_run_validation(demo, tmp_path, capsys):
    """A run validates at its last step; evaluate on its checkpoint (and its HF export) gives the same."""
    cfg = compose([*TINY, f"data.path={demo / 'train'}", f"eval.val_path={demo / 'eval'}", "eval.val_rows=4",
                   "trainer.max_steps=3", "trainer.log_interval=3"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.setup()
    trainer.fit()  # validates after the last step
    printed = capsys.readouterr().out
    in_run = trainer.validate()
    assert f"val step 3 | loss {in_run['val/loss']:.4f}" in printed
    trainer.save(wait=True)
    trainer.loader.close()

    assert main([str(tmp_path / "run" / "ckpt" / "latest"), "--data", str(demo / "eval"),
                 "--out", str(tmp_path / "val.json")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == format_validation(3, in_run, ["eval"])
    offline = json.loads((tmp_path / "val.json").read_text())
    assert offline == pytest.approx(in_run, rel=1e-6)

    from emu3_train.interop.hf import export_hf

    export_hf(tmp_path / "run" / "ckpt", tmp_path / "hf")
    assert main([str(tmp_path / "hf"), "--data", str(demo / "eval"), "--rows", "4", "--seq-len", "256",
                 "--out", str(tmp_path / "hf.json")]) == 0
    assert json.loads((tmp_path / "hf.json").read_text()) == pytest.approx(in_run, rel=1e-6)


def test_model_source_loads_both_kinds_and_fails_in_one_line(tmp_path, demo):
    with pytest.raises(ModelSourceError, match="does not exist; pass a run's ckpt folder") as e:
        load_model(tmp_path / "nope")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="empty: not a loadable checkpoint"):
        load_model(tmp_path / "empty")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelSourceError, match="not an Emu3 model folder"):
        load_model(llama)
    assert main([str(llama), "--data", str(demo / "eval")]) == 2

    from emu3_train.interop.hf import save_hf

    model = _model(2)
    v = get_vocab("demo")
    save_hf(model, _cfg(), tmp_path / "hf",
            {"pad_token_id": v.pad, "bos_token_id": v.bos, "eos_token_id": v.eos})
    src = load_model(tmp_path / "hf")
    assert src.kind == "hf" and src.vocab is not None and src.vocab.name == "demo" and src.step is None
    for (name, a), b in zip(model.state_dict().items(), src.model.state_dict().values()):
        assert torch.equal(a, b), name


def _cfg():
    from dataclasses import replace

    from emu3_train.config import ModelConfig

    return replace(ModelConfig(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2,
                               num_kv_heads=1), vocab_size=get_vocab("demo").size)


def test_validation_settings_are_checked():
    from emu3_train.config import ConfigError, validate

    with pytest.raises(ConfigError, match="eval.val_rows must be >= 1"):
        validate(compose([*TINY, "data.path=x", "eval.val_path=y", "eval.val_rows=0"]))
    with pytest.raises(ConfigError, match="eval.val_blend"):
        validate(compose([*TINY, "data.path=x", "eval.val_path=y", "eval.val_blend=[nope]"]))
    with pytest.raises(ConfigError, match="loss.task_weights has {'chat': 1.0}"):
        validate(compose([*TINY, "data.path=x", "+loss.task_weights.chat=1.0"]))
