"""The per-interval summary line carries what a user scans for."""

from emu3_train.metrics import format_summary


def test_summary_line():
    line = format_summary(40, 300, {"train/loss": 2.31424, "train/loss_text": 1.5,
                                    "train/loss_vision": float("nan"), "train/lr": 1e-3,
                                    "train/grad_norm": 0.5, "perf/tokens_per_s": 8512.3,
                                    "data/fill": 0.97})
    assert line.startswith("step 40/300 | loss 2.3142 | text 1.5000 | vision n/a")
    assert "tok/s 8,512" in line and "fill 0.97" in line and "\n" not in line
