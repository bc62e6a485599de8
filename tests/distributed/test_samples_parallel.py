"""In-run samples on a sharded model: every rank samples in lockstep (FSDP2 / TP forwards are
collective) and gets exactly what one process gets from the same weights."""

from __future__ import annotations

import pytest
from harness import run_distributed
from test_trainer_parallel import BASE as TRAINER_BASE

from emu3_train.recipes import compose
from emu3_train.trainer import Trainer

BASE = [*TRAINER_BASE, "trainer.sample_interval=1", "sample.per_prompt=1", "sample.max_caption_tokens=8",
        "sample.prompts=[a handwritten digit three,a handwritten digit seven]"]


def _sample(rank, world, data, run_dir, overrides):
    t = Trainer(compose([*BASE, f"data.path={data}", *overrides]), run_dir, rank, world)
    t.setup()
    t.train_step()  # weights differ from init, identically on every layout
    result = t.sample()
    png = result["images"].read_bytes() if rank == 0 else None
    return png, result.get("caption")


@pytest.mark.parametrize("layout", [["parallel.dp=2", "data.micro_batch_size=2"],
                                    ["parallel.dp=1", "parallel.tp=2", "data.micro_batch_size=4"]],
                         ids=["fsdp2", "tp2"])
def test_parallel_samples_equal_one_process(data, tmp_path, layout):
    ref_png, ref_caption = _sample(0, 1, data, tmp_path / "one", ["data.micro_batch_size=4"])
    got = run_distributed(_sample, 2, (data, tmp_path / "two", layout))
    assert got[0][1] == got[1][1] == ref_caption  # both ranks got rank 0's tokens
    assert got[0][0] == ref_png  # the same images, pixel for pixel
