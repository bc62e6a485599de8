"""HF interop: our model on packed rows gives, per document, transformers' ``Emu3ForCausalLM``
logits on that document alone -- after import and after export; export(import(x)) is x bit for
bit; a checkpoint written sharded by two processes exports whole; bad input is one line, exit 2."""

import json
import os
import shutil
import socket
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from emu3_train.checkpoint import load_weights, save_checkpoint
from emu3_train.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from emu3_train.interop.hf import export_hf, import_hf, load_checkpoint_model, load_hf, main
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.optim import build_optimizer, build_scheduler
from emu3_train.vocab import get_vocab

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, THETA = 67, 32, 80, 2, 4, 2, 5_000.0
# Two packed rows of 24 tokens: segment lengths, the last one of each row is padding.
ROWS = [[7, 9, 5, 3], [13, 8, 3]]
TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, attention_dropout=0.0,
            rms_norm_eps=1e-5, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": THETA})
MODEL_CFG = ModelConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_layers=LAYERS, num_heads=HEADS,
                        num_kv_heads=KV_HEADS, rope_theta=THETA, attention_dropout=0.0)


@torch.no_grad()
def _visible(model):
    """Init-sized weights make attention nearly uniform and hide RoPE/mask mistakes."""
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.uniform_(0.5, 1.5)
        else:
            p.normal_(0.0, 0.2)
    return model.eval()


def packed_batch(vocab_size):
    """tokens/position_ids [2, 24], cu_seqlens over the 48 flattened tokens, and the documents
    as (row, start, end); positions restart at 0 in every segment, padding included."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, vocab_size, (len(ROWS), sum(ROWS[0])), generator=generator)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ROWS])
    lengths = [n for row in ROWS for n in row]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    docs = []
    for r, row in enumerate(ROWS):
        starts = [0, *torch.tensor(row).cumsum(0).tolist()]
        tokens[r, starts[-2]:] = 0  # padding
        docs += [(r, starts[i], starts[i + 1]) for i in range(len(row) - 1)]
    return tokens, positions, cu_seqlens, docs


@torch.no_grad()
def assert_matches_hf_per_document(ours, reference):
    tokens, positions, cu_seqlens, docs = packed_batch(ours.lm_head.weight.shape[0])
    logits = ours.logits(ours(tokens, positions, cu_seqlens))
    for r, start, end in docs:
        expected = reference(input_ids=tokens[r:r + 1, start:end], use_cache=False).logits[0]
        err = (logits[r, start:end] - expected).abs().max().item()
        assert err <= 1e-4, f"row {r} tokens [{start}, {end}): max abs logit error {err:.2e}"


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """(folder, model): a tiny random fp32 Emu3ForCausalLM saved by transformers."""
    path = tmp_path_factory.mktemp("hf") / "tiny"
    model = _visible(transformers.Emu3ForCausalLM(transformers.Emu3TextConfig(**TEXT)))
    model.save_pretrained(path)
    return path, model


def test_import_gives_hf_logits_per_document_on_packed_rows(hf_tiny, tmp_path):
    hf_dir, reference = hf_tiny
    ckpt, cfg = import_hf(hf_dir, tmp_path / "ckpt")
    assert cfg == load_checkpoint_model(ckpt)[1] and cfg.vocab_size == VOCAB and cfg.rope_theta == THETA
    trained = Emu3CausalLM(cfg, VOCAB)  # what checkpoint.init_from does
    load_weights(ckpt, trained)
    loaded, loaded_cfg = load_hf(hf_dir)
    assert loaded_cfg == cfg and not loaded.training
    for ours in (trained.eval(), loaded):
        assert_matches_hf_per_document(ours, reference)


def _trained_checkpoint(ckpt_dir):
    """Our model after two AdamW steps, saved as the trainer does (meta.json: the whole config)."""
    cfg = TrainConfig(model=MODEL_CFG, data=DataConfig(path="unused", vocab="demo"))
    model = _visible(Emu3CausalLM(cfg.model, get_vocab("demo").size)).train()
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, OptimConfig(warmup_steps=0), 10)
    for _ in range(2):
        tokens, positions, cu_seqlens, _ = packed_batch(get_vocab("demo").size)
        model.logits(model(tokens, positions, cu_seqlens)).logsumexp(-1).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    save_checkpoint(ckpt_dir, 2, model, opt, sched, {"epoch": 0, "cursor": 16}, asdict(cfg), 96)
    return model.eval()


def test_export_gives_our_logits_in_transformers(tmp_path):
    ours = _trained_checkpoint(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0  # follows `latest`
    reference = transformers.Emu3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    c, demo = reference.config, get_vocab("demo")
    assert (c.vocab_size, c.num_hidden_layers, c.num_key_value_heads) == (demo.size, LAYERS, KV_HEADS)
    assert c.rope_parameters["rope_theta"] == THETA and not c.tie_word_embeddings
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (demo.pad, demo.bos, demo.eos)
    assert reference.generation_config.eos_token_id == demo.eos
    assert_matches_hf_per_document(ours, reference)


def _tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _config(folder):
    return {k: v for k, v in json.loads((folder / "config.json").read_text()).items()
            if k != "transformers_version"}


def test_export_of_import_is_bit_identical(hf_tiny, tmp_path):
    hf_dir = hf_tiny[0]
    import_hf(hf_dir, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "again")
    original, again = _tensors(hf_dir), _tensors(tmp_path / "again")
    assert original.keys() == again.keys()
    for k in original:
        assert original[k].dtype == again[k].dtype == torch.float32 and torch.equal(original[k], again[k]), k
    assert _config(tmp_path / "again") == _config(hf_dir)

    # bf16 through the CLI, written in shards with an index: still bit-identical and loadable
    bf16 = tmp_path / "bf16"
    transformers.Emu3ForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    assert main(["import", str(bf16), str(tmp_path / "ckpt16")]) == 0
    assert main(["export", str(tmp_path / "ckpt16"), str(tmp_path / "out16"), "--dtype", "bf16",
                 "--max-shard-gb", "0.00001"]) == 0
    shards = sorted(p.name for p in (tmp_path / "out16").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "out16" / "model.safetensors.index.json").is_file()
    original, again = _tensors(bf16), _tensors(tmp_path / "out16")
    assert all(again[k].dtype == torch.bfloat16 and torch.equal(original[k], again[k]) for k in original)
    reloaded = transformers.Emu3ForCausalLM.from_pretrained(tmp_path / "out16")
    assert reloaded.dtype == torch.bfloat16


def test_import_takes_the_text_model_of_emu3_for_conditional_generation(tmp_path):
    """Emu3-Gen-hf / Emu3-Chat-hf folders: keys ``text_model.model.*``, plus a VQ-VAE to drop."""
    vq = dict(codebook_size=16, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1],
              num_res_blocks=1, attn_resolutions=[], double_latent=False, temporal_downsample_factor=1)
    visual = {f"<|visual token {i:06d}|>": 40 + i for i in range(16)}
    config = transformers.Emu3Config(text_config=TEXT, vq_config=vq,
                                     vocabulary_map={"<|image token|>": 60, **visual})
    model = transformers.Emu3ForConditionalGeneration(config)
    _visible(model.model.text_model)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path / "mm")
    ours, cfg = load_hf(tmp_path / "mm")
    assert cfg.num_layers == LAYERS and cfg.vocab_size == VOCAB
    text_only = transformers.Emu3ForCausalLM(transformers.Emu3TextConfig(**TEXT)).eval()
    text_only.load_state_dict(ours.state_dict())
    assert_matches_hf_per_document(ours, model.eval())
    assert_matches_hf_per_document(ours, text_only)


def _save_sharded(rank, world, port, ckpt_dir, full_path):
    """Worker: FSDP2 over 2 gloo processes, each saving its half of every parameter."""
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = TrainConfig(model=MODEL_CFG, data=DataConfig(path="unused", vocab="demo"))
        model = _visible(Emu3CausalLM(cfg.model, get_vocab("demo").size))
        if rank == 0:
            torch.save(model.state_dict(), full_path)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = build_optimizer(model, cfg.optim)
        save_checkpoint(ckpt_dir, 1, model, opt, build_scheduler(opt, cfg.optim, 10), {}, asdict(cfg), 0,
                        is_rank0=rank == 0)
    finally:
        torch.distributed.destroy_process_group()


def test_export_reshards_a_checkpoint_saved_by_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full_path = tmp_path / "full.pt"
    torch.multiprocessing.spawn(_save_sharded, args=(2, port, tmp_path / "ckpt", full_path), nprocs=2)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    full, exported = torch.load(full_path), load_file(tmp_path / "hf" / "model.safetensors")
    assert full.keys() == exported.keys() and all(torch.equal(full[k], exported[k]) for k in full)


def _one_error_line(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert str(needle) in err, err
    return err


def test_bad_input_is_one_line_naming_the_file(hf_tiny, tmp_path, capsys):
    hf_dir = hf_tiny[0]
    missing = tmp_path / "nope"
    _one_error_line(capsys, ["export", str(missing), str(tmp_path / "out")], missing)
    _one_error_line(capsys, ["import", str(missing), str(tmp_path / "ckpt")], missing)
    _one_error_line(capsys, ["import", str(tmp_path), str(tmp_path / "ckpt")], tmp_path / "config.json")

    wrong = tmp_path / "wrong"
    shutil.copytree(hf_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "intermediate_size": INTER + 16}))
    _one_error_line(capsys, ["import", str(wrong), str(tmp_path / "ckpt")],
                    f"{wrong}: does not fit config.json",
                    f"'model.layers.0.mlp.gate_proj.weight' has shape [{INTER}, {HIDDEN}] in the folder but "
                    f"[{INTER + 16}, {HIDDEN}] in config.json", f"({3 * LAYERS} of another shape)")
    assert not (tmp_path / "ckpt").exists()

    (wrong / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    _one_error_line(capsys, ["import", str(wrong), str(tmp_path / "ckpt")], wrong / "config.json",
                    "hidden_act")

    import_hf(hf_dir, tmp_path / "ckpt")
    _one_error_line(capsys, ["import", str(hf_dir), str(tmp_path / "ckpt")], tmp_path / "ckpt", "not empty")
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    meta["config"]["model"]["hidden_size"] = 2 * HIDDEN
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(meta))
    _one_error_line(capsys, ["export", str(tmp_path / "ckpt"), str(tmp_path / "out")], tmp_path / "ckpt",
                    "model.embed_tokens.weight")

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "python -m emu3_train.interop.hf import HF_DIR CKPT_DIR" in capsys.readouterr().out
