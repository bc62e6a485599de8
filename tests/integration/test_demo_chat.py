"""The post-training demo path end to end at a small size, through the real CLIs: a few-step
stage-1 demo checkpoint -> the digits chat set -> experiment=demo_chat from those weights (with its
validation line) -> chat_eval writes eval.json with answer accuracy per question type.

The accuracy goal (>= 0.9 per type) is measured by ``make post-train-demo``, not here.

    .venv/bin/pytest -q tests/integration/test_demo_chat.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from emu3_train.data_pipelines.demo_chat import QUESTIONS, build_demo_chat

REPO = Path(__file__).resolve().parents[2]

SMALL = ["data.seq_len=512", "data.micro_batch_size=1", "data.global_batch_size=1", "optim.warmup_steps=1",
         "wandb.mode=disabled"]


@pytest.mark.slow
def test_stage1_checkpoint_to_chat_eval(demo_data, run_train, tmp_path):
    stage1 = run_train("experiment=demo", f"data.path={demo_data / 'train'}", "run_name=s1",
                       "trainer.max_steps=2", "trainer.sample_interval=0", "eval.task=none",
                       "eval.val_path=null", *SMALL)
    assert stage1.returncode == 0, stage1.stderr[-3000:]
    ckpt = tmp_path / "runs" / "s1" / "ckpt" / "latest"

    chat = tmp_path / "chat"
    done, built = build_demo_chat(chat)
    assert built and done["train"]["documents"] == 3 * done["train"]["images"]

    proc = run_train("experiment=demo_chat", f"data.path={chat / 'train'}", f"checkpoint.init_from={ckpt}",
                     "run_name=c", "trainer.max_steps=4", "trainer.log_interval=2", "eval.val_interval=2",
                     "eval.val_rows=2", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vals = re.findall(r"^val step (\d+) \| loss ([\d.]+) \| text ([\d.]+) \| vision ", proc.stdout, re.M)
    assert [int(s) for s, *_ in vals] == [2, 4], proc.stdout  # the held-out answers, every 2 steps
    assert all(float(loss) == float(text) > 0 for _, loss, text in vals)  # answers are text only

    run = tmp_path / "runs" / "c"
    assert (run / "ckpt" / "latest").read_text().strip() == "step_000004"
    out = run / "eval.json"
    ev = subprocess.run([sys.executable, "-m", "emu3_train.chat_eval", str(run / "ckpt" / "latest"),
                         "--data", str(chat / "eval"), "--out", str(out), "--limit", "9",
                         "--max-new-tokens", "4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads(out.read_text())
    assert sorted(result["accuracy"]) == sorted(QUESTIONS)  # one accuracy per question type
    assert result["answers"] == {k: 3 for k in QUESTIONS} and result["step"] == 4
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
    line = r"^chat eval: digit [\d.]+ \| parity [\d.]+ \| plus_one [\d.]+ \| overall [\d.]+ \(9 answers"
    assert re.search(line, ev.stdout, re.M), ev.stdout
