"""The demo evaluation on the generation engine: eval.json has the unguided and the guided t2i
accuracy, and two evaluations of the same weights write identical files (the demo's promise).

    .venv/bin/python -m pytest -q tests/unit/test_evaluate.py
"""

import json

import pytest
import torch

from emu3_train.config import EvalConfig, ModelConfig
from emu3_train.evaluate import evaluate_digits
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.vocab import get_vocab

V = get_vocab("demo")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from emu3_train.data_pipelines.demo import build_demo

    out = tmp_path_factory.mktemp("demo")
    build_demo(out)
    return out


@pytest.fixture
def one_thread():
    """Small ops on a shared 2-core machine: one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_eval_reports_guided_and_unguided_accuracy_and_is_deterministic(demo, tmp_path, one_thread):
    torch.manual_seed(0)
    model = Emu3CausalLM(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                     num_kv_heads=1), V.size).eval()
    cfg = EvalConfig(task="digits", path=str(demo / "eval"), samples_per_class=2, guidance_scale=3.0)
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        run.mkdir()
        evaluate_digits(model, V, cfg, str(demo / "train"), run)
    result = json.loads((runs[0] / "eval.json").read_text())
    assert {"t2i_accuracy", "t2i_accuracy_guided", "i2t_accuracy"} <= set(result)
    assert result["guidance_scale"] == 3.0 and result["t2i_samples"] == 20
    for name in ("eval.json", "samples.png", "samples_guided.png"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    assert (runs[0] / "samples.png").read_bytes() != (runs[0] / "samples_guided.png").read_bytes()
