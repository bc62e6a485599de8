"""``checkpoint.init_from=HF_DIR``: an exported or transformers folder fills a model built on the meta
device bit for bit (sharded safetensors, bf16 cast, the text model of a multimodal folder, a tied
head), and a folder describing another model is one line naming config.json or the tensor."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from emu3_train.checkpoint import load_weights
from emu3_train.config import ModelConfig
from emu3_train.interop.hf import save_hf
from emu3_train.interop.hf_load import load_hf_weights, model_config_of
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.weights import WeightsMismatchError

transformers = pytest.importorskip("transformers")

VOCAB = 67
CFG = ModelConfig(hidden_size=32, intermediate_size=80, num_layers=2, num_heads=4, num_kv_heads=2,
                  rope_theta=5_000.0, attention_dropout=0.0)
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000.0}, **SPECIAL)


def _empty(cfg=CFG, vocab=VOCAB):
    """As build_model leaves it before a load: built on meta, storage allocated, not initialized."""
    with torch.device("meta"):
        model = Emu3CausalLM(cfg, vocab)
    return model.to_empty(device="cpu")


def _random(cfg=CFG, vocab=VOCAB, seed=0):
    torch.manual_seed(seed)
    model = Emu3CausalLM(cfg, vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _assert_equal(model, tensors):
    got = model.state_dict()
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t.float()), name


def _tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture
def exported(tmp_path):
    """(folder, model): our fp32 model written as `interop.hf export` writes it."""
    model = _random()
    return save_hf(model, CFG, tmp_path / "hf", SPECIAL), model


def test_exported_folder_loads_bitwise(exported, tmp_path):
    folder, source = exported
    model = _empty()
    assert load_weights(folder, model) == folder  # checkpoint.init_from's entry point dispatches
    _assert_equal(model, source.state_dict())
    assert model_config_of(model) == {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 80,
                                      "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                      "rope_theta": 5_000.0, "rms_norm_eps": CFG.rms_norm_eps}

    sharded = save_hf(source, CFG, tmp_path / "sharded", SPECIAL, max_shard_gb=0.00002)  # ~21 KB a file
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    model = _empty()
    load_hf_weights(sharded, model)
    _assert_equal(model, source.state_dict())


def test_transformers_folders_load_with_casts(tmp_path):
    hf = transformers.Emu3ForCausalLM(transformers.Emu3TextConfig(**TEXT))
    hf.save_pretrained(tmp_path / "fp32")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    for folder in ("fp32", "bf16"):
        model = _empty()
        load_weights(tmp_path / folder, model)
        stored = _tensors(tmp_path / folder)
        assert {t.dtype for t in stored.values()} == {torch.float32 if folder == "fp32" else torch.bfloat16}
        _assert_equal(model, stored)  # bf16 -> fp32 is exact


def test_text_model_of_emu3_for_conditional_generation(tmp_path):
    vq = dict(codebook_size=16, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1],
              num_res_blocks=1, attn_resolutions=[], double_latent=False, temporal_downsample_factor=1)
    visual = {f"<|visual token {i:06d}|>": 40 + i for i in range(16)}
    config = transformers.Emu3Config(text_config=TEXT, vq_config=vq,
                                     vocabulary_map={"<|image token|>": 60, **visual})
    transformers.Emu3ForConditionalGeneration(config).save_pretrained(tmp_path / "mm")
    stored = _tensors(tmp_path / "mm")
    model = _empty()
    load_weights(tmp_path / "mm", model)
    text = {k.removeprefix("text_model."): v for k, v in stored.items() if k.startswith("text_model.")}
    assert len(text) < len(stored)  # the VQ-VAE is dropped
    _assert_equal(model, text)


def _edited_copy(folder, dest, edit):
    """A copy of the HF ``folder`` at ``dest`` whose tensors ``edit(tensors)`` changed in place."""
    shutil.copytree(folder, dest)
    tensors = load_file(dest / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors")
    return dest


def test_tied_head_is_the_embedding_table(exported, tmp_path):
    folder, source = exported
    tied = _edited_copy(folder, tmp_path / "tied", lambda tensors: tensors.pop("lm_head.weight"))
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    model = _empty()
    load_weights(tied, model)
    assert torch.equal(model.lm_head.weight, source.model.embed_tokens.weight)


def _error(folder, model) -> str:
    with pytest.raises(WeightsMismatchError) as e:
        load_weights(folder, model)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_another_model_is_one_line_naming_config_json(exported):
    folder, _ = exported
    deeper = replace(CFG, num_layers=4, num_heads=2)  # 2 heads of 16: the same shapes as 4 of 8
    message = _error(folder, _empty(deeper))
    assert message.startswith(f"{folder / 'config.json'}: describes another model than this one")
    assert "num_hidden_layers=2 but model.num_layers=4" in message
    assert "num_attention_heads=4 but model.num_heads=2" in message
    assert message.endswith("set model.num_layers=2 model.num_heads=4")
    assert "model.vocab_size=67" in _error(folder, _empty(vocab=VOCAB + 1))


def test_missing_unexpected_and_reshaped_tensors_are_named(exported, tmp_path):
    folder, _ = exported

    def edit(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(3)
        tensors["model.norm.weight"] = torch.ones(31)

    bad = _edited_copy(folder, tmp_path / "bad", edit)
    message = _error(bad, _empty())
    assert message.startswith(f"{bad}: does not fit this model: ")
    assert "the folder has no tensor 'model.layers.1.mlp.up_proj.weight' (1 missing)" in message
    assert ("the folder has tensor 'model.layers.1.mlp.extra.weight' that this model lacks "
            "(1 unexpected)") in message
    assert ("tensor 'model.norm.weight' has shape [31] in the folder but [32] in this model "
            "(1 of another shape)") in message


def test_import_refuses_tensors_config_json_does_not_describe(exported, tmp_path):
    """`interop.hf import` builds the model config.json describes: a third layer's tensors in a
    2-layer folder are named, not dropped."""
    from emu3_train.interop.hf import import_hf

    folder, _ = exported
    extra = _edited_copy(folder, tmp_path / "extra", lambda tensors: tensors.update(
        {k.replace("layers.1.", "layers.2."): v.clone() for k, v in tensors.items() if ".layers.1." in k}))
    with pytest.raises(WeightsMismatchError) as e:
        import_hf(extra, tmp_path / "ckpt")
    message = str(e.value)
    assert message.startswith(f"{extra}: does not fit config.json: the folder has tensor "
                              "'model.layers.2.input_layernorm.weight' that config.json lacks (9 unexpected)")
    assert message.endswith("the folder has 3 layers, config.json 2") and not (tmp_path / "ckpt").exists()
