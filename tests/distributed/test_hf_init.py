"""``checkpoint.init_from=HF_DIR`` into a sharded model: built on meta, parallelized, then filled from
the safetensors shard by shard; the gathered weights equal the folder's bit for bit. Under FSDP2
alone every parameter is a plain Shard(0) and each rank reads only its own rows."""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed
from safetensors.torch import load_file

from emu3_train.build import build_model
from emu3_train.interop.hf import save_hf
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.parallel.dims import ParallelDims
from emu3_train.parallel.mesh import build_mesh
from emu3_train.recipes import compose

# an odd vocabulary: FSDP2's Shard(0) of the embedding and head is uneven (142 + 141 rows)
VOCAB = 283
SMALL = ["experiment=demo", "data.path=unused", "model.num_layers=2", "model.hidden_size=64",
         "model.intermediate_size=96", "model.num_heads=4", "model.num_kv_heads=2", "data.seq_len=128",
         "data.micro_batch_size=1", "data.global_batch_size=4", f"model.vocab_size={VOCAB}"]


def _load_and_gather(rank, world, layout, hf_dir):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    from emu3_train.interop.hf_load import _local_rows

    dims = ParallelDims(**layout)
    overrides = [f"parallel.{k}={v}" for k, v in layout.items()]
    cfg = compose([*SMALL, *overrides, f"checkpoint.init_from={hf_dir}"])
    model, _ = build_model(cfg, VOCAB, dims, build_mesh(dims, "cpu"), torch.device("cpu"), rank,
                           weights=cfg.checkpoint.init_from)
    params = dict(model.named_parameters())
    row_reads = sorted(n for n, p in params.items() if isinstance(p, DTensor) and _local_rows(p) is not None)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    gathered = {k: v.clone() for k, v in full.items()} if rank == 0 else None
    return {"gathered": gathered, "row_reads": row_reads, "params": sorted(params)}


@pytest.mark.parametrize("layout", [{"dp": 2, "cp": 1, "tp": 1}, {"dp": 1, "cp": 1, "tp": 2}],
                         ids=["dp2", "tp2"])
def test_sharded_model_loads_an_hf_folder(tmp_path, layout):
    cfg = compose(SMALL)
    torch.manual_seed(3)
    source = Emu3CausalLM(cfg.model, VOCAB)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0.0, 0.5)
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    hf = save_hf(source, cfg.model, tmp_path / "hf", special)
    stored = load_file(hf / "model.safetensors")

    results = run_distributed(_load_and_gather, 2, (layout, hf))
    got = results[0]["gathered"]
    assert got.keys() == stored.keys()
    for name, t in stored.items():
        assert t.dtype == torch.float32 and torch.equal(got[name], t), name
    for r in results:
        if layout["dp"] == 2:  # FSDP2 alone: every parameter is read as this rank's rows only
            assert r["row_reads"] == r["params"]
        else:  # TP's row-parallel Shard(1) weights read the full tensor and keep their slice
            assert "model.layers.0.self_attn.o_proj.weight" not in r["row_reads"]
