"""Bad input ends the run before training with one line naming the file, key or field, exit != 0."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from emu3_train.data.index import build_index, read_index, write_index
from emu3_train.vocab import get_vocab

FAST = ["experiment=demo", "trainer.max_steps=2", "wandb.mode=disabled", "eval.task=none",
        "eval.val_path=null",  # the shards made here have no held-out split next to them
        "data.seq_len=256", "data.micro_batch_size=1", "data.global_batch_size=1"]


def _error_line(proc) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_missing_data_path(run_train, tmp_path):
    proc = run_train(*FAST, f"data.path={tmp_path / 'nowhere'}")
    assert str(tmp_path / "nowhere") in _error_line(proc)
    assert proc.returncode == 2


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, payload in samples:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _npy(tokens) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(tokens, np.int32), allow_pickle=False)
    return buf.getvalue()


def test_out_of_vocab_id_in_foreign_shard_fails_indexing(tmp_path):
    shards = tmp_path / "foreign"
    shards.mkdir()
    v = get_vocab("demo")
    _write_tar(shards / "shard-000000.tar", [
        ("ok-1.tokens.npy", _npy([v.bos, 1, 2, v.eos])), ("ok-1.json", b'{"task": "text", "source": "t"}'),
        ("bad-7.tokens.npy", _npy([v.bos, 9999, v.eos])), ("bad-7.json", b'{"task": "text", "source": "t"}'),
    ])
    proc = subprocess.run([sys.executable, "-m", "emu3_train.data_pipelines.write_shards", "--reindex",
                           str(shards), "--vocab", "demo"], capture_output=True, text=True, timeout=120)
    line = _error_line(proc)
    assert "shard-000000.tar" in line and "bad-7" in line and "9999" in line
    assert not (shards / "shard-000000.idx").exists()


def test_payload_altered_after_indexing_names_shard_and_key(run_train, demo_data, tmp_path):
    shards = tmp_path / "altered"
    shutil.copytree(demo_data / "eval", shards)
    tar = shards / "shard-000000.tar"
    index = read_index(tar)
    data = bytearray(tar.read_bytes())
    # overwrite the last token of every document with an id far outside the demo vocabulary
    for i in range(len(index)):
        end = int(index.tokens_offset[i] + index.tokens_size[i])
        data[end - 4:end] = np.int32(9999).tobytes()
    tar.write_bytes(bytes(data))
    proc = run_train(*FAST, f"data.path={shards}")
    line = _error_line(proc)
    assert "shard-000000.tar" in line and re.search(r"sample 'doc-\d+'", line), line


def test_vision_block_longer_than_seq_len(run_train, demo_data):
    proc = run_train(*FAST, f"data.path={demo_data / 'eval'}", "data.seq_len=64",
                     "data.oversize_policy=error")
    line = _error_line(proc)
    assert "shard-000000" in line and "doc-" in line and "64" in line


def test_oversize_documents_skipped_by_policy(run_train, demo_data):
    proc = run_train(*FAST, f"data.path={demo_data / 'eval'}", "data.seq_len=64",
                     "data.oversize_policy=skip")
    # every demo document holds a 79-token image: nothing is left to train on
    assert proc.returncode != 0 and "error: " in proc.stderr


def test_unknown_override_names_the_key(run_train, demo_data):
    proc = run_train(*FAST, f"data.path={demo_data / 'train'}", "trainer.bogus=3")
    assert proc.returncode != 0 and "trainer.bogus" in proc.stderr


def test_bad_config_value_names_the_field(run_train, demo_data):
    proc = run_train(*FAST, f"data.path={demo_data / 'train'}", "model.num_kv_heads=3")
    assert "model.num_heads" in _error_line(proc) and proc.returncode == 2


def test_index_of_valid_shard_still_builds(demo_data):
    # guard for the tests above: a well-formed shard indexes cleanly
    tar = next((demo_data / "eval").glob("*.tar"))
    write_index(build_index(tar, get_vocab("demo")), tar.with_suffix(".idx.check"))


# -- issue 13: unknown keys, value ranges, checkpoint paths: one line, exit code 2, nothing built --

def test_added_unknown_keys_are_rejected(run_train, demo_data):
    proc = run_train(*FAST, f"data.path={demo_data / 'train'}", "+trainer.max_stepz=3", "+foo=1")
    line = _error_line(proc)
    assert proc.returncode == 2 and "trainer.max_stepz" in line and "did you mean trainer.max_steps?" in line


def test_unknown_key_error_does_not_recommend_plus(run_train, demo_data):
    proc = run_train(*FAST, f"data.path={demo_data / 'train'}", "trainer.max_stepz=3")
    line = _error_line(proc)
    assert proc.returncode == 2 and "trainer.max_stepz" in line and "trainer.max_steps?" in line
    assert "+trainer.max_stepz" not in proc.stderr


@pytest.mark.parametrize("override", ["model.rms_norm_eps=-1", "optim.weight_decay=-1", "model.init_std=-1",
                                      "optim.beta1=2", "optim.eps=-1"])
def test_out_of_range_values_name_the_field(run_train, demo_data, override):
    proc = run_train(*FAST, f"data.path={demo_data / 'train'}", override)
    line = _error_line(proc)
    assert proc.returncode == 2 and line.startswith(f"error: {override.split('=')[0]} must be"), line


def _hf_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def _partial_saves(root):
    tmp = root / "ckpt" / ".tmp_step_000002"
    (tmp / "rng").mkdir(parents=True)
    step = root / "ckpt" / "step_000001"
    (step / "rng").mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    return tmp, step


@pytest.mark.parametrize("case", ["init_missing", "resume_missing", "hf", "hf_resume", "tmp_step",
                                  "no_metadata"])
def test_checkpoint_path_problems_say_what_to_do(run_train, demo_data, tmp_path, case):
    tmp, step = _partial_saves(tmp_path / "old")
    field, path, expected = {
        "init_missing": ("init_from", "/does/not/exist", "does not exist"),
        "resume_missing": ("resume", "/does/not/exist", "does not exist"),
        # an HF folder is a valid init_from, but not one whose config.json is no Emu3 model's
        "hf": ("init_from", _hf_folder(tmp_path / "hf"), "config.json: model_type=None is not an Emu3"),
        "hf_resume": ("resume", _hf_folder(tmp_path / "hf2"), "has no optimizer or data state to resume"),
        "tmp_step": ("init_from", tmp, "unfinished save"),
        "no_metadata": ("resume", step, "incomplete checkpoint"),
    }[case]
    proc = run_train(*FAST, f"data.path={demo_data / 'train'}", f"checkpoint.{field}={path}")
    line = _error_line(proc)
    assert proc.returncode == 2 and line.startswith(f"error: checkpoint.{field}={path}:"), line
    assert expected in line and "Traceback" not in proc.stderr


def test_stage2_before_stage1_says_run_stage1_first(demo_data, tmp_path):
    # as `make pretrain-stage2` runs it, in a checkout where stage 1 has not been trained yet
    env = {**os.environ, "WANDB_SILENT": "true", "TIKTOKEN_CACHE_DIR": ""}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "emu3_train.train", "experiment=demo_stage2", "wandb.mode=disabled",
           f"data.path={demo_data / 'train'}", f"eval.path={demo_data / 'eval'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    line = _error_line(proc)
    assert proc.returncode == 2 and "runs/demo-stage1/ckpt/latest" in line, line
    assert "run `make pretrain-stage1` first or pass INIT=" in line


# -- issue 13 item 7: a model that cannot fit is refused before allocating, naming the planner ------

def test_model_that_cannot_fit_is_refused_naming_the_planner(run_train, demo_data):
    import resource
    import shlex
    import time

    from emu3_train.memory_check import host_available_bytes
    from emu3_train.planner_memory import GIB

    available = host_available_bytes()
    if available is None or available > 126 * GIB:  # emu3_8b's fp32 weights + grads + AdamW: 126.5 GiB
        pytest.skip("this host could hold emu3_8b's training state (or reports no MemAvailable)")
    start = time.monotonic()
    proc = run_train(*FAST, "model=emu3_8b", f"data.path={demo_data / 'train'}")
    seconds = time.monotonic() - start
    line = _error_line(proc)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "model emu3_8b" in line and "cannot fit" in line, line
    assert seconds < 60, seconds
    # the command it names is this run's overrides on the planner, and runs as printed
    command = shlex.split(line.split("find a layout that fits with: ", 1)[1])
    assert command[:3] == ["python", "-m", "emu3_train.planner"]
    assert command[-4:] == ["--gpus", "1", "--gpu", "cpu"]
    assert {"experiment=demo", "model=emu3_8b", f"data.path={demo_data / 'train'}"} <= set(command)
    planned = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=300)
    assert planned.returncode == 0 and "emu3_8b on 1 x cpu" in planned.stdout, planned.stderr[-2000:]
    # no weights were allocated: no child process of this session came near emu3_8b's 31.6 GiB of
    # fp32 weights (ru_maxrss: the largest peak RSS of the children waited for, in KiB)
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 < 8 * GIB


# -- issue 13 case 8: skipped samples show on the console and are totalled at the end --------------

def test_skipped_bad_samples_show_in_the_summary_and_the_end_of_run_total(run_train, demo_data, tmp_path):
    from emu3_train.data.loader import PackedLoader
    from emu3_train.data.stream import ShardSet

    shards = tmp_path / "one_bad_per_row"
    shutil.copytree(demo_data / "eval", shards)
    # the first document of each of the run's two rows (seq_len 256, one row a step, the default
    # seed and pack window): flip its last token so the read fails its CRC-32
    loader = PackedLoader(ShardSet(shards, get_vocab("demo")), seq_len=256, micro_batch_size=1)
    bad = [loader.row(k)[0].doc_id for k in (0, 1)]
    assert all(len(loader.row(k)) > 1 for k in (0, 1))  # each row keeps a document to train on
    tar = shards / "shard-000000.tar"
    index = read_index(tar)
    data = bytearray(tar.read_bytes())
    for d in bad:  # one shard: doc id = sample number
        end = int(index.tokens_offset[d] + index.tokens_size[d])
        data[end - 4:end] = (np.frombuffer(data[end - 4:end], np.int32) ^ 1).tobytes()
    tar.write_bytes(bytes(data))
    proc = run_train(*FAST, f"data.path={shards}", "data.on_bad_sample=skip", "trainer.log_interval=1",
                     "trainer.sample_interval=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = [x for x in proc.stdout.splitlines() if x.startswith("step ")]
    assert len(summaries) == 2, proc.stdout
    assert re.search(r"\| fill [\d.]+ \| skipped 1$", summaries[0]) and summaries[1].endswith("| skipped 2")
    assert "data: 2 documents skipped (unreadable 2) in this run, up to step 2" in proc.stdout.splitlines()
