"""In-run samples: the grid and the captioned image are written, reproducible, and decoded through
a real Emu3 VQ-VAE when one is given."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from emu3_train.config import ModelConfig, SampleConfig
from emu3_train.data.stream import ShardSet
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.samples import CodeRenderer, InRunSampler, first_image
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=1, hidden_size=32, intermediate_size=64)
    return Emu3CausalLM(cfg, get_vocab("demo").size)


def test_sampler_writes_a_grid_and_a_captioned_image_reproducibly(demo_data, tmp_path, model):
    vocab = get_vocab("demo")
    source = ShardSet(demo_data / "train", vocab)
    cfg = SampleConfig(prompts=["a handwritten digit one", "a handwritten digit two"], per_prompt=3,
                       max_caption_tokens=5)
    sampler = InRunSampler(cfg, vocab, source, tmp_path, "cpu")
    image = first_image(source, vocab, load_tokenizer(vocab).decode)
    assert (sampler.height, sampler.width) == image.shape == (8, 8)  # the data's own image size
    first = sampler(model, step=7)
    again = sampler(model, step=8)
    assert first["images"].name == "step_000007.png" and first["caption_image"].is_file()
    assert first["images"].read_bytes() == again["images"].read_bytes()  # fixed seed and prompts
    assert isinstance(first["caption"], str) and first["caption"] == again["caption"]
    grid = Image.open(first["images"])
    assert grid.width >= 3 * 64 and grid.height >= 2 * 64  # 2 rows x 3 images of 8x8 codes at 8x


def test_sampler_needs_a_grid_size_when_the_data_has_no_image(tmp_path, model):
    class TextOnly:
        path, max_block = "text-shards", np.zeros(3, np.int64)

    with pytest.raises(ValueError, match="text-shards has no image: set sample.height"):
        InRunSampler(SampleConfig(), get_vocab("demo"), TextOnly(), tmp_path, "cpu")
    sampler = InRunSampler(SampleConfig(height=2, width=3, per_prompt=1), get_vocab("demo"), TextOnly(),
                           tmp_path, "cpu")
    out = sampler(model, step=1)
    assert "caption" not in out and len(out["prompts"]) == 4  # the default prompts


def test_vq_renderer_decodes_codes_to_pixels(tmp_path):
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    config = Emu3VQVAEConfig(codebook_size=17, embed_dim=4, latent_channels=4, base_channels=32,
                             channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                             hidden_size=32, temporal_downsample_factor=4)
    torch.manual_seed(0)
    Emu3VQVAE(config).save_pretrained(tmp_path / "vq")
    rgb = CodeRenderer(17, str(tmp_path / "vq"))(np.random.default_rng(0).integers(0, 17, (2, 3, 4)))
    assert rgb.shape == (2, 24, 32, 3) and rgb.dtype == np.uint8 and rgb.std() > 0
    with pytest.raises(ValueError, match="codebook_size 17, the vocabulary 64"):
        CodeRenderer(64, str(tmp_path / "vq"))
    with pytest.raises(FileNotFoundError, match="not a saved Emu3VQVAE"):
        CodeRenderer(17, str(tmp_path))
