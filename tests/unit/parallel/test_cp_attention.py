"""Chunked and flex document attention of a CP shard against the dense-mask reference.

No process group: the shard's queries and the row's keys are built by hand exactly as the CP
layout builds them (global token index, document id, keys in row order), for CP rank r of cp.
"""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils.checkpoint import checkpoint

from emu3_train.model.flex import compiled_flex_attention
from emu3_train.model.recompute import selective_checkpoint_context
from emu3_train.parallel.context_parallel import cp_positions
from emu3_train.parallel.cp_attention import (
    chunked_document_attention,
    cp_block_mask,
    dense_document_attention,
    document_causal_mask,
    plan_query_chunks,
    query_chunk_size,
    rank_to_row_order,
    row_to_rank_order,
)

# 2 rows of 60 tokens; documents cross the 2·cp chunk boundaries (cp = 3: chunks of 10), row 0
# ends with a padding segment, row 1's first document starts in row 0 (a row end ends it)
CU_SEQLENS = [0, 7, 22, 23, 41, 55, 70, 97, 101, 120]
SEQ = 60


def shard(cp: int, rank: int | None, batch: int = 2, cu=CU_SEQLENS, seq=SEQ):
    """(q_index, q_docs, k_index, k_docs, q_first_cols) int64; ``rank=None``: the whole row as
    queries (Ulysses)."""
    cu = torch.tensor(cu)
    rows = torch.arange(batch)[:, None] * seq
    cols = torch.arange(seq) if rank is None else cp_positions(seq, rank, cp)
    q_index, k_index = rows + cols, rows + torch.arange(seq)
    q_docs = torch.searchsorted(cu[1:], q_index, right=True)
    k_docs = torch.searchsorted(cu[1:], k_index, right=True)
    first = (cu[q_docs] - rows).clamp_min(0)
    return q_index, q_docs, k_index, k_docs, first


def qkv(batch, sq, sk, hq, hkv, d=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, sq, hq, d, generator=gen, dtype=dtype).requires_grad_()
    k = torch.randn(batch, sk, hkv, d, generator=gen, dtype=dtype).requires_grad_()
    v = torch.randn(batch, sk, hkv, d, generator=gen, dtype=dtype).requires_grad_()
    return q, k, v


def out_and_grads(fn, q, k, v, seed=1):
    out = fn(q, k, v)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10, 1000])  # 7: does not divide S_local = 20
@pytest.mark.parametrize("cp,rank,hq,hkv", [(3, 0, 4, 2), (3, 2, 4, 1), (2, 1, 2, 2), (3, None, 4, 2)],
                         ids=["cp3-rank0-gqa", "cp3-rank2-mqa", "cp2-rank1-mha", "ulysses-row"])
def test_chunked_equals_dense_reference_with_grads(chunk_size, cp, rank, hq, hkv):
    q_index, q_docs, k_index, k_docs, first = shard(cp, rank)
    chunks = plan_query_chunks(q_index % SEQ, first, chunk_size)
    q, k, v = qkv(2, q_index.shape[1], SEQ, hq, hkv)
    ids = (q_index, q_docs, k_index, k_docs)
    expected = out_and_grads(lambda *t: dense_document_attention(*t, *ids), q, k, v)
    got = out_and_grads(lambda *t: chunked_document_attention(*t, *ids, chunks), q, k, v)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10, msg=name)


def test_chunks_cover_each_query_once_within_a_row_chunk_and_reach_every_allowed_key():
    cp, rank, size = 3, 1, 4
    q_index, q_docs, k_index, k_docs, first = shard(cp, rank)
    chunks = plan_query_chunks(q_index % SEQ, first, size)
    local = SEQ // cp
    assert [c[:2] for c in chunks] == [(0, 4), (4, 8), (8, 10), (10, 14), (14, 18), (18, 20)]
    mask = document_causal_mask(q_index, q_docs, k_index, k_docs)[:, 0]  # [B, S_local, S]
    reached = torch.zeros(local, SEQ, dtype=torch.bool)
    for qs, qe, ks, ke in chunks:
        reached[qs:qe, ks:ke] = True
        allowed = mask[:, qs:qe].any(0).any(0).nonzero().flatten()
        assert allowed.min() == ks and allowed.max() == ke - 1  # tight: skips what no query needs
    assert not (mask & ~reached).any()
    assert reached.sum() < local * SEQ / 3  # most of the [S_local, S] work is skipped


def test_chunked_with_dropout_replays_the_forward_drops_in_backward():
    q_index, q_docs, k_index, k_docs, first = shard(3, 0)
    chunks = plan_query_chunks(q_index % SEQ, first, 6)
    q, k, v = qkv(2, q_index.shape[1], SEQ, 4, 2)
    ids = (q_index, q_docs, k_index, k_docs)

    def per_chunk_autograd(q, k, v):  # the same draws in the same order, masks kept by autograd
        outs = [dense_document_attention(q[:, qs:qe], k[:, ks:ke], v[:, ks:ke], q_index[:, qs:qe],
                                         q_docs[:, qs:qe], k_index[:, ks:ke], k_docs[:, ks:ke], dropout=0.3)
                for qs, qe, ks, ke in chunks]
        return torch.cat(outs, dim=1)

    torch.manual_seed(5)
    expected = out_and_grads(per_chunk_autograd, q, k, v)
    torch.manual_seed(5)
    got = out_and_grads(lambda *t: chunked_document_attention(*t, *ids, chunks, dropout=0.3), q, k, v)
    no_dropout = chunked_document_attention(q, k, v, *ids, chunks)
    assert not torch.allclose(got[0], no_dropout)  # dropout is on
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10, msg=name)


def _saved_tensors(fn, *args):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn(*args)
    return out, saved


@pytest.mark.parametrize("seq", [240, 480])
def test_chunked_saves_nothing_of_size_s_local_times_s(seq):
    cp, rank, batch, heads, d = 2, 0, 1, 2, 4
    cu = [0, 17, seq // 2 + 5, seq]
    q_index, q_docs, k_index, k_docs, first = shard(cp, rank, batch=batch, cu=cu, seq=seq)
    local = seq // cp
    q, k, v = qkv(batch, local, seq, heads, heads, d=d, dtype=torch.float32)
    ids = (q_index, q_docs, k_index, k_docs)
    chunks = plan_query_chunks(q_index % seq, first, 16)
    out, saved = _saved_tensors(chunked_document_attention, q, k, v, *ids, chunks)
    assert max(t.numel() for t in saved) < local * seq / 8  # the dense mask has local * seq
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v, *ids))
    assert sum(t.numel() * t.element_size() for t in saved) <= inputs  # q, k, v, index vectors only
    out.sum().backward()  # and backward still works from those alone

    _, dense = _saved_tensors(dense_document_attention, q, k, v, *ids)  # what the bound excludes
    assert max(t.numel() for t in dense) >= local * seq


def test_query_chunk_size_keeps_one_chunk_mask_within_the_budget():
    # stage 2 at cp=8: 16,384 local queries against a 131,072-token row, bf16, 64 MiB per chunk
    size = query_chunk_size(1, 131_072, 4, torch.bfloat16, dropout=0.0)
    assert size == 170 and size * 131_072 * 3 <= 64 * 2**20
    assert query_chunk_size(1, 131_072, 4, torch.float32, dropout=0.1) < size  # math path: scores too
    assert query_chunk_size(64, 2**30, 32, torch.float32, dropout=0.1) == 1
    assert query_chunk_size(1, 4096, 4, torch.bfloat16, dropout=0.0) == 512  # short rows: capped


def test_rank_and_row_order_round_trip():
    cp, seq = 3, 12
    row = torch.arange(2 * seq).view(2, seq)
    ranks = [row[:, cp_positions(seq, r, cp)] for r in range(cp)]
    assert torch.equal(rank_to_row_order(ranks), row)
    assert torch.equal(row_to_rank_order(row, cp), torch.cat(ranks, dim=1))


@pytest.mark.parametrize("cp,rank,block", [(2, 0, 8), (2, 1, 8), (3, 2, 4)],
                         ids=["aligned-rank0", "aligned-rank1", "unaligned"])
def test_block_mask_matches_the_exact_block_mask(cp, rank, block):
    seq = 64 if block == 8 else 60  # chunks of 16 (two blocks of 8); of 10 (not a multiple of 4)
    cu = [0, 5, 21, 40, 41, 64, 100, 128] if seq == 64 else CU_SEQLENS
    q_index, q_docs, k_index, k_docs, _ = shard(cp, rank, cu=cu, seq=seq)
    mine = cp_block_mask(q_index, q_docs, k_index, k_docs, block)
    def mask_mod(b, h, q, kv):
        return (k_index[b, kv] <= q_index[b, q]) & (q_docs[b, q] == k_docs[b, kv])

    exact = create_block_mask(mask_mod, 2, None, q_index.shape[1], seq, device="cpu", BLOCK_SIZE=block)
    if block == 8:  # blocks of consecutive columns: the same blocks, full and partial
        assert torch.equal(mine.to_dense(), exact.to_dense())
        assert torch.equal(mine.kv_num_blocks, exact.kv_num_blocks)
        assert torch.equal(mine.full_kv_num_blocks, exact.full_kv_num_blocks)
    else:  # a query block straddles the two row chunks: a superset, still correct
        assert (mine.to_dense() >= exact.to_dense()).all()


@pytest.mark.parametrize("cp,rank", [(3, 1), (2, 0)])
def test_flex_with_the_cp_block_mask_equals_the_reference_forward(cp, rank):
    # the documents x 32 in 128-token blocks (CPU flex needs >= 128; 4-token blocks at x 1)
    q_index, q_docs, k_index, k_docs, _ = shard(cp, rank, cu=[32 * c for c in CU_SEQLENS], seq=32 * SEQ)
    q, k, v = (t.detach() for t in qkv(2, q_index.shape[1], 32 * SEQ, 4, 2, dtype=torch.float32))
    block = cp_block_mask(q_index, q_docs, k_index, k_docs, 128)
    with torch.no_grad():  # no CPU backward: forward only (compiled, ~10 s the first time)
        expected = dense_document_attention(q, k, v, q_index, q_docs, k_index, k_docs)
        got = compiled_flex_attention()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        block_mask=block, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_chunked_dropout_gradients_survive_activation_recompute(recompute):
    q_index, q_docs, k_index, k_docs, first = shard(3, 2)
    chunks = plan_query_chunks(q_index % SEQ, first, 4)
    ids = (q_index, q_docs, k_index, k_docs)

    def layer(q, k, v):  # dropout on both sides of the core, as in a decoder block
        out = chunked_document_attention(torch.nn.functional.dropout(q, 0.2), k, v, *ids, chunks, dropout=0.3)
        return torch.nn.functional.dropout(out, 0.2)

    context = {"context_fn": selective_checkpoint_context} if recompute == "selective" else {}
    results = []
    for wrapped in (layer, lambda *t: checkpoint(layer, *t, use_reentrant=False, **context)):
        torch.manual_seed(11)
        results.append(out_and_grads(wrapped, *qkv(2, q_index.shape[1], SEQ, 4, 2)))
    for name, g, e in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10, msg=name)


# -- CUDA: the flex CP path (forward and backward) and chunked SDPA against the reference, bf16 -------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="flex training needs CUDA")


def _gpu_case(seq=2048, cp=4, rank=1):
    cu = [0, 300, 301, 1100, 1800, seq, seq + 900, 2 * seq]  # 2 rows; a 1-token and a row-crossing doc
    ids = [t.cuda() for t in shard(cp, rank, cu=cu, seq=seq)]
    q, k, v = (t.detach().cuda().requires_grad_() for t in qkv(2, seq // cp, seq, 8, 2, d=64,
                                                                dtype=torch.float32))
    return ids, q, k, v


def _bf16(*tensors):
    return [t.detach().bfloat16().requires_grad_() for t in tensors]


@cuda
@pytest.mark.parametrize("impl", ["flex", "chunked"])
def test_gpu_cp_attention_matches_the_reference_forward_and_backward(impl):
    (q_index, q_docs, k_index, k_docs, first), q, k, v = _gpu_case()
    ids = (q_index, q_docs, k_index, k_docs)
    expected = out_and_grads(lambda *t: dense_document_attention(*t, *ids), q, k, v)  # fp32
    if impl == "flex":
        block = cp_block_mask(*ids)

        def fn(q, k, v):
            return compiled_flex_attention()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             block_mask=block, enable_gqa=True).transpose(1, 2)
    else:
        chunks = plan_query_chunks(q_index % k_index.shape[1], first, 96)

        def fn(q, k, v):
            return chunked_document_attention(q, k, v, *ids, chunks)
    got = out_and_grads(fn, *_bf16(q, k, v))
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        error = (g.float() - e).abs().max() / e.abs().max()
        assert error < 2e-2, f"{impl} {name}: relative error {error:.3g}"
