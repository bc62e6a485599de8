"""The per-interval summary line carries what a user scans for."""

import math

import pytest

from emu3_train.metrics import format_skipped, format_summary


def test_summary_line():
    line = format_summary(40, 300, {"train/loss": 2.31424, "train/loss_text": 1.5,
                                    "train/loss_vision": float("nan"), "train/lr": 1e-3,
                                    "train/grad_norm": 0.5, "perf/tokens_per_s": 8512.3,
                                    "data/fill": 0.97})
    assert line.startswith("step 40/300 | loss 2.3142 | text 1.5000 | vision n/a")
    assert "tok/s 8,512" in line and "fill 0.97" in line and "\n" not in line


def test_summary_line_shows_mfu_and_memory():
    line = format_summary(1, 2, {"train/loss": 1.0, "perf/mfu": 0.4712, "perf/mem_gb": 61.234})
    assert "mfu 47.1% | mem 61.2GB" in line
    assert "mfu n/a" in format_summary(1, 2, {"perf/mfu": float("nan")})


def test_summary_line_shows_skipped_documents_only_when_there_are_some():
    m = {"train/loss": 1.0, "data/fill": 0.97}
    assert format_summary(1, 2, m).endswith("| fill 0.97")
    assert format_summary(1, 2, {**m, "data/skipped": 0.0}) == format_summary(1, 2, m)
    line = format_summary(1, 2, {**m, "data/skipped": 3.0})
    assert line == format_summary(1, 2, m) + " | skipped 3"


def test_end_of_run_line_totals_the_skips_by_kind():
    stats = {"skipped": 2, "skipped_oversize": 1, "skipped_bad": 1, "skipped_shard_docs": 0}
    # the total counts the bad samples of every dp rank (here 2), the stats are this rank's
    assert format_skipped(3.0, stats, 40) == ("data: 3 documents skipped (oversize 1, unreadable 2) "
                                              "in this run, up to step 40")
    one = {"skipped_oversize": 0, "skipped_shard_docs": 1}
    assert format_skipped(1.0, one, 5).startswith("data: 1 document skipped (in shards left out 1)")
    assert format_skipped(0.0, {}, 40) == ""


def test_perf_meter_divides_model_flops_by_gpus_time_and_peak():
    import numpy as np
    import torch

    from emu3_train.config import ModelConfig
    from emu3_train.data.batch import build_batch
    from emu3_train.data.packing import Piece
    from emu3_train.flops import step_flops
    from emu3_train.metrics import PerfMeter
    from emu3_train.vocab import get_vocab

    vocab, model = get_vocab("demo"), ModelConfig()
    docs = {0: np.arange(3, 50), 1: np.arange(3, 30)}
    batch = build_batch([[Piece(0, 0, 47), Piece(1, 0, 27)]], docs, (), 96, vocab)
    meter = PerfMeter(model, vocab.size, gpus_per_replica=4, device=torch.device("cpu"),
                      precision="fp32", peak_tflops=2.0)
    meter.add([batch, batch], vocab.pad)
    out = meter.summarize(seconds=0.5)
    flops = 2 * step_flops(model, vocab.size, [47, 27])  # the padding tail is not model work
    assert out["perf/tflops_per_gpu"] == pytest.approx(flops / 4 / 0.5 / 1e12)
    assert out["perf/mfu"] == pytest.approx(flops / 4 / 0.5 / 2e12)
    assert out["perf/mem_gb"] > 0.01  # this process's peak RSS
    assert meter.summarize(1.0)["perf/tflops_per_gpu"] == 0.0  # the interval was reset
    no_peak = PerfMeter(model, vocab.size, 1, torch.device("cpu"), "fp32")
    assert math.isnan(no_peak.summarize(1.0)["perf/mfu"])  # a CPU has no data-sheet peak


def test_wandb_mode_from_the_environment_wins(tmp_path, monkeypatch):
    from emu3_train.config import WandbConfig
    from emu3_train.metrics import MetricLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = MetricLogger(WandbConfig(mode="offline"), tmp_path, "r", {}, enabled=True)
    assert logger.run is None and not (tmp_path / "wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricLogger(WandbConfig(mode="disabled"), tmp_path, "r", {}, enabled=True)
    try:
        assert logger.run is not None and (tmp_path / "wandb").is_dir()
    finally:
        logger.finish()
