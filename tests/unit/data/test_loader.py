"""PackedLoader: a deterministic global row stream, split over dp ranks, resumable across dp sizes,
worker counts and micro-batch sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emu3_train.data.blend import open_blend
from emu3_train.data.index import ShardError
from emu3_train.data.loader import PackedLoader
from emu3_train.data.stream import ShardSet

S, WINDOW = 64, 8


@pytest.fixture
def shards(make_docs, make_shards, vocab):
    return ShardSet(make_shards(make_docs(40, max_text=50), max_count=15), vocab)


@pytest.fixture
def blend(make_docs, make_shards, vocab):
    """Two sources, 3:1 by tokens: (ShardSets, weights)."""
    make_shards(make_docs(30, seed=1, max_text=50), max_count=10, name="blend/a")
    root = make_shards(make_docs(12, seed=2, max_text=80), max_count=5, name="blend/b").parent
    return open_blend(root, ["3:a", "1:b"], vocab)


def loader(shards, mb=2, rank=0, dp=1, seed=0, **kw):
    return PackedLoader(shards, seq_len=S, micro_batch_size=mb, dp_rank=rank, dp_size=dp, seed=seed,
                        pack_window=WINDOW, **kw)


def take(ld, n):
    return [next(ld) for _ in range(n)]


def rows_of(batches):
    return [row for b in batches for row in b["tokens"]]


def assert_same_rows(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def run_ranks(make, dp, steps, state=None):
    """Rows consumed by ``dp`` ranks over ``steps`` steps, in global order; and the ranks' states."""
    ranks = [make(r) for r in range(dp)]
    for ld in ranks:
        if state is not None:
            ld.load_state_dict(json.loads(json.dumps(state)))
    per_rank = [take(ld, steps) for ld in ranks]
    rows = []
    mb = ranks[0].micro_batch_size
    for step in range(steps):
        for j in range(mb):  # step block: its i-th row goes to rank i % dp
            rows += [per_rank[r][step]["tokens"][j] for r in range(dp)]
    states = [ld.state_dict() for ld in ranks]
    for ld in ranks:
        ld.close()
    return rows, states


def test_stream_is_deterministic_given_the_seed(shards):
    a, b = take(loader(shards), 6), take(loader(shards), 6)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
    other = take(loader(shards, seed=1), 6)
    assert not all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, other))


@pytest.mark.parametrize("mb", [1, 2])
def test_dp_ranks_interleave_to_the_single_rank_stream(shards, mb):
    ref = rows_of(take(loader(shards, mb=2 * mb), 5))
    merged, _ = run_ranks(lambda r: loader(shards, mb=mb, rank=r, dp=2), dp=2, steps=5)
    assert_same_rows(merged, ref)


def test_state_dict_round_trip_gives_identical_next_batches(shards):
    ld = loader(shards)
    take(ld, 4)
    state = json.loads(json.dumps(ld.state_dict()))
    expected = take(ld, 5)
    resumed = loader(shards)
    resumed.load_state_dict(state)
    for x, y in zip(take(resumed, 5), expected):
        for k in ("tokens", "labels", "loss_weight", "position_ids", "cu_seqlens"):
            assert torch.equal(x[k], y[k])


@pytest.mark.parametrize("source", ["one", "blend"])
def test_resume_under_other_dp_workers_and_micro_batch_continues_the_same_stream(shards, blend, source):
    """Stop at step k with dp=2 and 2 workers; resume with dp=1, dp=4 and 0 workers: the rows
    consumed equal an uninterrupted dp=1 run's, nothing repeated or lost."""
    data, weights = (shards, None) if source == "one" else blend
    make = lambda mb, dp, workers: lambda r: loader(data, mb=mb, rank=r, dp=dp,  # noqa: E731
                                                    weights=weights, num_workers=workers, prefetch=3)
    ref, _ = run_ranks(make(mb=1, dp=1, workers=0), dp=1, steps=100)

    before, states = run_ranks(make(mb=2, dp=2, workers=2), dp=2, steps=3)  # 12 rows
    assert all(s == states[0] for s in states) and states[0]["cursor"] == 12
    for mb, dp, workers, steps in ((3, 1, 0, 16), (1, 4, 0, 12), (2, 4, 2, 6)):
        after, _ = run_ranks(make(mb=mb, dp=dp, workers=workers), dp=dp, steps=steps, state=states[0])
        assert_same_rows(before + after, ref[:len(before) + len(after)])
    # and again from a cursor that is no multiple of the new step size, in the second epoch
    mid, states = run_ranks(make(mb=1, dp=1, workers=0), dp=1, steps=77)
    assert states[0]["sources"][0]["epoch"] == 1
    after, _ = run_ranks(make(mb=2, dp=2, workers=2), dp=2, steps=5, state=states[0])
    assert_same_rows(mid + after, ref[:97])


def test_state_counts_rows_consumed_not_rows_prefetched(shards):
    eager, plain = loader(shards, num_workers=2, prefetch=4), loader(shards)
    take(eager, 3)
    take(plain, 3)
    assert eager.state_dict() == plain.state_dict() and eager.cursor == 6
    assert eager.stats() == plain.stats()
    eager.close()


def test_a_rank_reads_only_the_documents_of_its_rows(shards):
    ld = loader(shards, mb=2, rank=1, dp=2)
    read = []
    original = shards.read
    shards.read = lambda d: (read.append(d), original(d))[1]
    next(ld)
    mine = {p.doc_id for k in (1, 3) for p in ld.row(k)}
    assert set(read) == mine


def test_oversize_documents_are_skipped_and_counted_or_named(make_docs, make_shards, vocab):
    shards = ShardSet(make_shards(make_docs(30, max_side=7), max_count=30), vocab)
    oversize = set(np.flatnonzero(shards.max_block > S).tolist())
    assert oversize
    ld = loader(shards, mb=2)
    take(ld, 20)
    seen = {p.doc_id for k in range(40) for p in ld.row(k)}  # 40 rows: past the end of epoch 0
    assert seen == set(range(len(shards))) - oversize
    assert ld.stats()["skipped"] == ld.stats()["skipped_oversize"] >= len(oversize)
    first = min(oversize)
    with pytest.raises(ShardError, match=f"shard-000000.tar: sample 'doc-{first:09d}': vision block"):
        loader(shards, oversize_policy="error")


def test_stats_and_state_guards(shards, blend):
    ld = loader(shards)
    take(ld, 3)
    stats = ld.stats()
    assert 0.9 < stats["fill"] <= 1 and stats["docs_per_row"] > 0 and stats["skipped"] == 0
    state = ld.state_dict()
    assert state["version"] == 2 and state["cursor"] == 6 and state["num_docs"] == [40]
    with pytest.raises(ValueError, match="seq_len=64"):
        PackedLoader(shards, seq_len=128, micro_batch_size=2, pack_window=WINDOW).load_state_dict(state)
    with pytest.raises(ValueError, match="weights"):
        loader(blend[0], weights=[1, 1]).load_state_dict(loader(blend[0], weights=blend[1]).state_dict())
    with pytest.raises(ValueError, match="version 1 .*first-fit"):
        ld.load_state_dict({"version": 1, "epoch": 0, "cursor": 6})
    with pytest.raises(ValueError, match="dp_rank 2"):
        loader(shards, rank=2, dp=2)
    with pytest.raises(ValueError, match="on_bad_sample"):
        loader(shards, on_bad_sample="ignore")


def test_tasks_filter_leaves_out_video_and_is_part_of_the_state(shards, make_docs, make_shards, vocab):
    tasks = shards.task_names
    video = set(np.flatnonzero(tasks == "video").tolist())
    assert video and len(video) < len(shards)
    ld = loader(shards, tasks=["t2i", "i2t", "text"])
    take(ld, 10)
    seen = {p.doc_id for k in range(40) for p in ld.row(k)}  # past the end of epoch 0
    assert seen == set(range(len(shards))) - video
    assert ld.stats()["skipped"] == 0  # left out by choice, not skipped as bad or oversize
    state = ld.state_dict()
    assert state["tasks"] == ["i2t", "t2i", "text"]
    with pytest.raises(ValueError, match="tasks="):
        loader(shards).load_state_dict(state)
    old = {k: v for k, v in loader(shards).state_dict().items() if k != "tasks"}
    loader(shards).load_state_dict(old)  # states written before the filter existed mean "all tasks"
    with pytest.raises(ValueError, match=r"tasks \['bogus'\] are not among"):
        loader(shards, tasks=["bogus"])
    text_only = [d for d in make_docs(20) if d["task"] == "text"]
    with pytest.raises(ValueError, match="no document of .*text-only has a task in"):
        loader(ShardSet(make_shards(text_only, name="text-only"), vocab), tasks=["video"])
