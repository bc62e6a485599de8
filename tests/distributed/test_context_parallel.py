"""Context parallelism on gloo against one process: loss, gradients, AdamW steps, document isolation.

The batch packs documents across the 2·cp chunk boundaries, with padding, and GQA heads, so the
load-balanced chunk order, the per-document mask and the K/V gather (or Ulysses all-to-all) all
have to be right for the numbers to match. Some runs cut the queries into chunks of a few tokens
(chunks then cross documents) under activation recompute; the flex core is checked forward only
(no CPU backward).
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from torch.distributed.device_mesh import init_device_mesh

from emu3_train.config import ModelConfig
from emu3_train.loss import weighted_ce
from emu3_train.model.decoder import Emu3CausalLM, apply_recompute
from emu3_train.parallel.context_parallel import apply_cp, shard_batch
from emu3_train.parallel.cp_attention import (
    AllGatherCore,
    AutoAllGatherCore,
    FlexAllGatherCore,
    RowOrderAttention,
    rank_to_row_order,
)

VOCAB = 283
SEQ = 32
DOCS = [[5, 13, 9], [3, 22]]  # + padding; boundaries cross the chunks of cp = 2 and 4
PERTURBED = (0, 5, 18)  # row, start, end of the document the isolation test changes
STEPS = 3
FLEX_SCALE = 32  # the flex test's rows: 1,024 tokens, so 128-token blocks are full, partial and skipped


def tiny_cfg(attn_impl="sdpa") -> ModelConfig:
    return ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                       rope_theta=10_000.0, attn_impl=attn_impl)


def make_model(attn_impl="sdpa") -> Emu3CausalLM:
    torch.manual_seed(0)
    return Emu3CausalLM(tiny_cfg(attn_impl), VOCAB)


def make_batch(seed=1, scale=1) -> dict:
    """The ``data.batch`` contract by hand: docs then a padding segment per row (every length x
    ``scale``)."""
    docs, seq = [[scale * n for n in lens] for lens in DOCS], scale * SEQ
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (len(docs), seq), generator=gen)
    labels = torch.full_like(tokens, -100)
    positions = torch.zeros_like(tokens)
    bounds = [0]
    for r, lens in enumerate(docs):
        start = 0
        for n in lens:
            labels[r, start:start + n - 1] = tokens[r, start + 1:start + n]
            positions[r, start:start + n] = torch.arange(n)
            start += n
            bounds.append(r * seq + start)
        tokens[r, start:] = 0
        positions[r, start:] = torch.arange(seq - start)
        bounds.append((r + 1) * seq)
    weight = torch.where(torch.rand(tokens.shape, generator=gen) < 0.3, 0.5, 1.0)
    weight[labels == -100] = 0.0
    return {"tokens": tokens, "labels": labels, "loss_weight": weight, "position_ids": positions,
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32), "num_docs": 5}


def perturbed(batch: dict) -> dict:
    r, start, end = PERTURBED
    tokens = batch["tokens"].clone()
    tokens[r, start:end] = (tokens[r, start:end] + 7) % VOCAB
    return {**batch, "tokens": tokens}


def loss_sum(model, hidden, batch):
    total, _ = weighted_ce(hidden, model.lm_head.weight, batch["labels"], batch["loss_weight"],
                           vision_start=None, impl="reference")
    return total


# AdamW divides by sqrt(v): an element whose gradient is near zero moves by up to ~lr (1e-3) whatever
# its size, so gradients equal within 1e-5 can leave such an element 1e-5 apart after a few steps (1
# in 6,144 reached 1.6e-5 on an AVX-512 CPU). 5% of lr still catches any wrong step.
PARAM_ATOL = 5e-5


def train(model, batch, forward, reduce):
    """Loss and gradients of step 1, then parameters after ``STEPS`` AdamW steps (as numpy)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    weight = reduce(batch["loss_weight"].sum())
    for step in range(STEPS):
        opt.zero_grad()
        local = loss_sum(model, forward(model, batch), batch)
        (local / weight).backward()
        for p in model.parameters():
            p.grad = reduce(p.grad)
        if step == 0:
            loss = float(reduce(local.detach()) / weight)
            grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        opt.step()
    return loss, grads, {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def _forward(m, shard):
    return m(shard["tokens"], shard["position_ids"], shard["cu_seqlens"], token_index=shard["token_index"])


def _global_hidden(model, batch, rank, world, group):
    local = _forward(model, shard_batch(batch, rank, world)).detach()
    shards = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(shards, local, group=group)
    return rank_to_row_order(shards).numpy()


def _cp_worker(rank, world, impl, chunk_size, recompute, batch):
    model = make_model()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    apply_cp(model, mesh, impl)
    chunked = [m for m in model.modules() if isinstance(m, (AllGatherCore, RowOrderAttention))]
    assert len(chunked) == 2  # one chunked SDPA core per layer
    for core in chunked:
        core.chunk_size = chunk_size  # None: the memory budget's (here: whole row chunks)
    apply_recompute(model, recompute)
    group = mesh.get_group()

    def global_hidden(b):
        return _global_hidden(model, b, rank, world, group)

    def reduce(t):
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    with torch.no_grad():
        hidden, hidden_perturbed = global_hidden(batch), global_hidden(perturbed(batch))
    try:
        model(batch["tokens"], batch["position_ids"], batch["cu_seqlens"])
        missing_index_error = ""
    except ValueError as e:
        missing_index_error = str(e)
    loss, grads, params = train(model, shard_batch(batch, rank, world), _forward, reduce)
    return dict(hidden=hidden, hidden_perturbed=hidden_perturbed, loss=loss, grads=grads, params=params,
                missing_index_error=missing_index_error)


@pytest.fixture(scope="module")
def reference():
    batch = make_batch()
    model = make_model()
    with torch.no_grad():
        hidden = model(batch["tokens"], batch["position_ids"], batch["cu_seqlens"]).numpy()
    loss, grads, params = train(model, batch, lambda m, b: m(b["tokens"], b["position_ids"], b["cu_seqlens"]),
                                lambda t: t)
    return dict(hidden=hidden, loss=loss, grads=grads, params=params)


@pytest.fixture(scope="module", params=[
    pytest.param(("allgather", 2, None, "none"), id="allgather-cp2"),
    pytest.param(("ulysses", 2, None, "none"), id="ulysses-cp2"),
    pytest.param(("allgather", 2, 3, "selective"), id="allgather-cp2-chunk3-selective"),
    pytest.param(("ulysses", 2, 5, "full"), id="ulysses-cp2-chunk5-full"),
    pytest.param(("allgather", 4, None, "none"), id="allgather-cp4", marks=pytest.mark.slow),  # ~30 s here
])
def cp_run(request):
    impl, cp, chunk_size, recompute = request.param
    return run_distributed(_cp_worker, cp, args=(impl, chunk_size, recompute, make_batch()))


def test_shard_batch_keeps_chunk_r_and_its_mirror_and_round_trips():
    batch = make_batch()
    whole = shard_batch(batch, 0, 1)  # cp = 1: unchanged, no token_index, so a plain model takes it
    assert whole.keys() == batch.keys() and all(whole[k] is batch[k] for k in batch)
    for cp in (2, 4):
        chunk = SEQ // (2 * cp)
        shards = [shard_batch(batch, r, cp) for r in range(cp)]
        for r, shard in enumerate(shards):
            cols = list(range(r * chunk, (r + 1) * chunk)) + list(range((2 * cp - 1 - r) * chunk,
                                                                         (2 * cp - r) * chunk))
            for key in ("tokens", "labels", "loss_weight", "position_ids"):
                assert torch.equal(shard[key], batch[key][:, cols])
            flat = torch.tensor([[row * SEQ + c for c in cols] for row in range(len(DOCS))])
            assert torch.equal(shard["token_index"], flat)  # the index space of cu_seqlens
            assert shard["cu_seqlens"] is batch["cu_seqlens"] and shard["num_docs"] == batch["num_docs"]
        for key in ("tokens", "labels", "loss_weight", "position_ids"):
            assert torch.equal(rank_to_row_order([s[key] for s in shards]), batch[key])
        weights = sum(float(s["loss_weight"].sum()) for s in shards)
        assert weights == float(batch["loss_weight"].sum())


def test_shard_batch_rejects_rows_not_divisible_by_2cp():
    with pytest.raises(ValueError, match="not divisible by 2 \\* cp = 6"):
        shard_batch(make_batch(), 0, 3)


def test_plain_model_rejects_a_token_index():
    b = shard_batch(make_batch(), 0, 2)
    with pytest.raises(ValueError, match="apply_cp"):
        make_model()(b["tokens"], b["position_ids"], b["cu_seqlens"], token_index=b["token_index"])


def test_cp_forward_and_loss_match_one_process(cp_run, reference):
    for result in cp_run:
        np.testing.assert_allclose(result["hidden"], reference["hidden"], atol=1e-5, rtol=1e-5)
        assert abs(result["loss"] - reference["loss"]) <= 1e-6 * abs(reference["loss"])


def test_cp_gradients_match_one_process(cp_run, reference):
    for result in cp_run:
        assert result["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            np.testing.assert_allclose(result["grads"][name], grad, atol=1e-5, rtol=0, err_msg=name)


def test_cp_adamw_steps_match_one_process(cp_run, reference):
    for result in cp_run:
        for name, param in reference["params"].items():
            np.testing.assert_allclose(result["params"][name], param, atol=PARAM_ATOL, rtol=0, err_msg=name)


def test_cp_never_attends_across_documents(cp_run):
    r, start, end = PERTURBED
    for result in cp_run:
        before, after = result["hidden"], result["hidden_perturbed"]
        changed = np.zeros(before.shape[:2], bool)
        changed[r, start:end] = True
        np.testing.assert_array_equal(after[~changed], before[~changed])
        assert not np.allclose(after[changed], before[changed])


def test_cp_model_needs_the_token_index(cp_run):
    for result in cp_run:
        assert "token_index=batch['token_index']" in result["missing_index_error"]


def _cores(model):
    return {type(layer.self_attn.core) for layer in model.model.layers}


def _flex_worker(rank, world, batch):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    group, shard = mesh.get_group(), shard_batch(batch, rank, world)
    out = {}
    for impl in ("sdpa", "auto", "flex"):
        model = make_model(impl)
        apply_cp(model, mesh, "allgather")
        out[impl + "_cores"] = _cores(model)
        # the rows x 32 in 128-token blocks (CPU flex needs >= 128): full, partial and skipped blocks
        with torch.no_grad():
            out[impl] = _global_hidden(model, batch, rank, world, group)
    try:
        _forward(model, shard)  # flex, with grad
    except RuntimeError as e:
        out["train_error"] = str(e)
    errors = {}
    for attn_impl, cp_impl in (("varlen", "allgather"), ("flex", "ulysses")):
        try:
            apply_cp(make_model(attn_impl), mesh, cp_impl)
        except ValueError as e:
            errors[attn_impl, cp_impl] = str(e)
    try:
        with torch.no_grad():
            _forward(model, {**shard, "token_index": shard["token_index"].flip(1)})
    except RuntimeError as e:
        errors["token_index"] = str(e)
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def flex_run():
    return run_distributed(_flex_worker, 2, args=(make_batch(scale=FLEX_SCALE),))  # compiles flex: ~20 s


@pytest.fixture(scope="module")
def flex_reference():
    batch = make_batch(scale=FLEX_SCALE)
    with torch.no_grad():
        return make_model()(batch["tokens"], batch["position_ids"], batch["cu_seqlens"]).numpy()


def test_cp_picks_its_attention_core_by_model_attn_impl(flex_run):
    for result in flex_run:
        assert result["sdpa_cores"] == {AllGatherCore}
        assert result["auto_cores"] == {AutoAllGatherCore}
        assert result["flex_cores"] == {FlexAllGatherCore}
        errors = result["errors"]
        assert "model.attn_impl=varlen has no context-parallel core" in errors["varlen", "allgather"]
        assert "parallel.cp_impl=allgather" in errors["flex", "ulysses"]
        assert "token_index is not shard_batch's" in errors["token_index"]


def test_cp_flex_and_auto_forward_match_one_process(flex_run, flex_reference):
    for result in flex_run:
        for impl in ("sdpa", "auto", "flex"):
            np.testing.assert_allclose(result[impl], flex_reference, atol=1e-5, rtol=1e-5, err_msg=impl)
        assert "model.attn_impl=flex cannot train on CPU" in result["train_error"]
