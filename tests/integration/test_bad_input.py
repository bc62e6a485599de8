"""Bad input ends the run before training with one line naming the file, key or field, exit != 0."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np

from emu3_train.data.index import build_index, read_index, write_index
from emu3_train.vocab import get_vocab

FAST = ["experiment=demo", "trainer.max_steps=2", "wandb.mode=disabled", "eval.task=none",
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
