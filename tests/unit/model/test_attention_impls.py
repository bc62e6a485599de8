"""model.attn_impl (sdpa | flex | varlen | auto) and model.recompute=selective.

sdpa is the reference. On CPU flex runs forward only (compiled) and varlen not at all; the CUDA
tests at the end compare both against sdpa in bf16, gradients included, on a GPU machine.
"""

from collections import Counter

import pytest
import torch
from test_decoder import VOCAB, make_model, packed_batch, tiny_cfg
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from emu3_train.config import ConfigError, TrainConfig, validate
from emu3_train.model.attention import (
    AutoCore,
    DocumentLayout,
    SdpaCore,
    build_attention_core,
    choose_attn_impl,
)
from emu3_train.model.decoder import apply_recompute
from emu3_train.model.flex import FlexCore
from emu3_train.model.recompute import save_policy
from emu3_train.model.varlen import VarlenCore

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="flex training and varlen need CUDA")

# 3 rows of 33 tokens: several documents per row, padding segments, lengths odd for any block size
DOCS = [[5, 7, 3], [9, 4, 13], [16, 17]]
SEQ = 33


def layout():
    tokens, positions, cu, _ = packed_batch(DOCS, seq_len=SEQ)
    return DocumentLayout(cu, positions)


@pytest.mark.parametrize("block_size", [4, 8, 128])
def test_block_mask_equals_flex_create_block_mask_of_the_document_mask(block_size):
    docs = layout()
    ids = docs.doc_ids
    mine = docs.block_mask(block_size)
    ref = create_block_mask(lambda b, h, q, k: (k <= q) & (ids[b, q] == ids[b, k]), len(DOCS), None,
                            SEQ, SEQ, device="cpu", BLOCK_SIZE=block_size)
    assert docs.block_mask(block_size) is mine  # built once per forward, shared by the layers
    assert torch.equal(mine.to_dense(), ref.to_dense())
    for count, index in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        n = getattr(ref, count)
        assert torch.equal(getattr(mine, count), n), count
        for b, i in torch.cartesian_prod(torch.arange(len(DOCS)), torch.arange(n.shape[-1])).tolist():
            k = n[b, 0, i]
            assert torch.equal(getattr(mine, index)[b, 0, i, :k], getattr(ref, index)[b, 0, i, :k]), index


def test_varlen_segments_are_the_documents_with_every_row_end():
    docs = DocumentLayout(torch.tensor([0, 2, 6, 8], dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int64))
    cu, longest = docs.varlen_segments()  # doc 1 spans rows 0 and 1: cut at 4
    assert cu.tolist() == [0, 2, 4, 6, 8] and cu.dtype == torch.int32 and longest == 2
    assert docs.varlen_segments()[0] is cu


def test_flex_forward_equals_sdpa_on_packed_rows_with_padding():
    # DOCS x 16 in 128-token blocks (CPU flex needs >= 128): full, partial and tail blocks at S=528
    tokens, positions, cu, _ = packed_batch([[16 * n for n in row] for row in DOCS], seq_len=16 * SEQ)
    reference = make_model()
    flex = make_model(attn_impl="flex")
    with torch.no_grad():  # no CPU backward: forward only (compiled, ~10 s the first time)
        expected = reference(tokens, positions, cu)
        got = flex(tokens, positions, cu)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cpu_flex_refuses_blocks_its_kernel_gets_wrong():
    tokens, positions, cu, _ = packed_batch(DOCS, seq_len=SEQ)
    flex = make_model(attn_impl="flex")
    for layer in flex.model.layers:
        layer.self_attn.core.block_size = 8
    with torch.no_grad(), pytest.raises(ValueError, match="blocks of >= 128 tokens"):
        flex(tokens, positions, cu)


def test_training_with_gpu_only_kernels_on_cpu_fails_naming_attn_impl():
    tokens, positions, cu, _ = packed_batch(DOCS, seq_len=SEQ)
    for impl, message in (("flex", "model.attn_impl=flex cannot train on CPU"),
                          ("varlen", "model.attn_impl=varlen runs only on CUDA")):
        model = make_model(attn_impl=impl).train()
        with pytest.raises(RuntimeError, match=message):
            model(tokens, positions, cu)


def test_auto_picks_the_fastest_kernel_that_runs():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert choose_attn_impl(cpu, torch.bfloat16, dropout_active=False) == "sdpa"
    assert choose_attn_impl(meta, torch.float32, dropout_active=False) == "sdpa"
    gpu = torch.device("cuda", 0)
    assert choose_attn_impl(gpu, torch.float32, dropout_active=False) == "flex"  # flash has no fp32
    assert choose_attn_impl(gpu, torch.bfloat16, dropout_active=True) == "sdpa"  # only sdpa drops out
    # auto computes what sdpa computes, and carries its dropout for context parallelism
    core = build_attention_core(tiny_cfg(attn_impl="auto", attention_dropout=0.1))
    assert isinstance(core, AutoCore) and core.dropout == 0.1
    model, auto = make_model(), make_model(attn_impl="auto")
    tokens, positions, cu, _ = packed_batch(DOCS, seq_len=SEQ)
    got, expected = auto(tokens, positions, cu), model(tokens, positions, cu)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_cpu_auto_attends_per_document_with_the_gradients_of_the_dense_mask():
    # on CPU auto runs one causal SDPA per document (no mask); it must train exactly like sdpa
    tokens, positions, cu, _ = packed_batch(DOCS, seq_len=SEQ)
    grads, outs = {}, {}
    for impl in ("sdpa", "auto"):
        model = make_model(attn_impl=impl).train()
        docs = DocumentLayout(cu, positions)
        outs[impl] = model(tokens, positions, cu)
        model.logits(outs[impl]).square().mean().backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters()}
    core = make_model(attn_impl="auto").model.layers[0].self_attn.core
    q, k = torch.randn(3, SEQ, 4, 8), torch.randn(3, SEQ, 2, 8)
    core(q, k, k, docs)
    assert docs._mask is None  # the dense mask was never built
    torch.testing.assert_close(outs["auto"], outs["sdpa"], atol=1e-6, rtol=1e-5)
    for name, g in grads["sdpa"].items():
        torch.testing.assert_close(grads["auto"][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_cores_by_name_and_dropout_only_where_supported():
    assert isinstance(build_attention_core(tiny_cfg(attn_impl="sdpa")), SdpaCore)
    assert isinstance(build_attention_core(tiny_cfg(attn_impl="flex")), FlexCore)
    assert isinstance(build_attention_core(tiny_cfg(attn_impl="varlen")), VarlenCore)
    for impl in ("flex", "varlen"):
        with pytest.raises(ConfigError, match=f"model.attn_impl={impl} has no attention dropout"):
            build_attention_core(tiny_cfg(attn_impl=impl, attention_dropout=0.1))


def _train_cfg(**model):
    cfg = TrainConfig()
    cfg.data.path, cfg.trainer.device, cfg.trainer.precision = "/shards", "cuda", "bf16"
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


@pytest.mark.parametrize("change,field", [
    ({"trainer.device": "cpu"}, "trainer.device=cpu"),
    ({"model.attention_dropout": 0.1}, "model.attention_dropout"),
    ({"parallel.cp": 2, "parallel.cp_impl": "ulysses"}, "parallel.cp_impl=ulysses"),
])
@pytest.mark.parametrize("impl", ["flex", "varlen"])
def test_config_rejects_what_gpu_kernels_cannot_train(impl, change, field):
    world_size = 2 if "parallel.cp" in change else 1
    validate(_train_cfg(attn_impl=impl, recompute="selective"), world_size=world_size)  # on CUDA: fine
    cfg = _train_cfg(attn_impl=impl)
    for dotted, value in change.items():
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=rf"model\.attn_impl={impl}.*{field}"):
        validate(cfg, world_size=world_size)


def test_config_allows_flex_but_not_varlen_under_allgather_cp():
    cfg = _train_cfg(attn_impl="flex")
    cfg.parallel.cp = 2
    validate(cfg, world_size=2)
    cfg.model.attn_impl = "varlen"
    with pytest.raises(ConfigError, match=r"model\.attn_impl=varlen has no context-parallel core"):
        validate(cfg, world_size=2)


def test_config_rejects_varlen_without_bf16():
    cfg = _train_cfg(attn_impl="varlen")
    cfg.trainer.precision = "fp32"
    with pytest.raises(ConfigError, match=r"model\.attn_impl=varlen needs trainer\.precision=bf16"):
        validate(cfg)


def test_selective_policy_saves_matmuls_attention_and_out_of_place_random_ops():
    aten = torch.ops.aten
    save, again = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE
    for op in (aten.mm.default, aten.bmm.default, aten.addmm.default,
               aten._scaled_dot_product_flash_attention_for_cpu.default, aten.native_dropout.default):
        assert save_policy(None, op) is save, op
    for op in (aten.mul.Tensor, aten.silu.default, aten.rsqrt.default, aten.add.Tensor,
               aten.bernoulli_.float):
        assert save_policy(None, op) is again, op


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_selective_recompute_gives_the_gradients_of_no_recompute(dropout):
    tokens, positions, cu, _ = packed_batch([[5, 7], [12]], seq_len=12)
    grads = {}
    for mode in ("none", "selective"):
        model = make_model(attention_dropout=dropout).train()
        apply_recompute(model, mode)
        torch.manual_seed(7)
        model.logits(model(tokens, positions, cu)).square().mean().backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["none"].items():
        torch.testing.assert_close(grads["selective"][name], g, atol=1e-6, rtol=1e-5, msg=name)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func] += 1
        return func(*args, **(kwargs or {}))


def test_selective_recompute_reruns_pointwise_ops_but_no_matmul_or_attention():
    aten = torch.ops.aten
    tokens, positions, cu, _ = packed_batch([[5, 7], [12]], seq_len=12)
    calls = {}
    for mode in ("none", "selective", "full"):
        model = make_model().train()
        apply_recompute(model, mode)
        loss = model.logits(model(tokens, positions, cu)).square().mean()
        with _CountOps() as counter:
            loss.backward()
        calls[mode] = counter.calls
    mm, attention = aten.mm.default, aten._scaled_dot_product_flash_attention_for_cpu.default
    assert calls["selective"][mm] == calls["none"][mm] < calls["full"][mm]
    assert calls["selective"][attention] == calls["none"][attention] == 0 < calls["full"][attention]
    assert calls["selective"][aten.silu.default] == calls["full"][aten.silu.default] == 2  # one per layer


# -- CUDA: flex and varlen against sdpa, forward and backward, bf16 -----------------------------------


def _gpu_run(impl, recompute="none", seed=0):
    torch.manual_seed(seed)
    from emu3_train.model.decoder import Emu3CausalLM

    model = Emu3CausalLM(tiny_cfg(attn_impl=impl, hidden_size=128, num_heads=2, num_kv_heads=1),
                         VOCAB).cuda().train()
    apply_recompute(model, recompute)
    tokens, positions, cu, _ = packed_batch([[100, 70, 30, 56], [256], [200, 31]], seq_len=256)
    tokens, positions, cu = tokens.cuda(), positions.cuda(), cu.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = model(tokens, positions, cu)
        model.logits(hidden).float().square().mean().backward()
    return hidden.float(), {n: p.grad.float() for n, p in model.named_parameters()}


def _assert_grads_close(got, expected, tolerance):
    """Every gradient within ``tolerance`` of the expected one's largest magnitude."""
    for name, g in expected.items():
        error = (got[name] - g).abs().max() / g.abs().max().clamp_min(1e-8)
        assert error < tolerance, f"{name}: relative error {error:.3g}"


@cuda
@pytest.mark.parametrize("impl", ["flex", "varlen", "auto"])
def test_gpu_kernel_matches_sdpa_forward_and_backward(impl):
    hidden, grads = _gpu_run("sdpa")
    got_hidden, got_grads = _gpu_run(impl)
    torch.testing.assert_close(got_hidden, hidden, atol=2e-2, rtol=2e-2)
    _assert_grads_close(got_grads, grads, 5e-2)


@cuda
@pytest.mark.parametrize("impl", ["sdpa", "flex", "varlen"])
def test_gpu_selective_recompute_gives_the_gradients_of_no_recompute(impl):
    _, grads = _gpu_run(impl)
    _, got = _gpu_run(impl, recompute="selective")
    _assert_grads_close(got, grads, 1e-2)  # bf16; flash/flex backward accumulate dq atomically
