"""Meta-device construction + materialize gives exactly the eager init, parameter by parameter."""

from __future__ import annotations

import pytest
import torch

from emu3_train.config import ModelConfig
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.model.init import init_values, materialize


@pytest.mark.parametrize("shape", [dict(num_layers=3, hidden_size=48, intermediate_size=80, num_heads=6,
                                        num_kv_heads=2), dict(num_layers=1, hidden_size=16,
                                        intermediate_size=24, num_heads=2, num_kv_heads=2)])
@pytest.mark.parametrize("seed", [0, 1234])
def test_meta_then_materialize_is_bitwise_the_eager_init(shape, seed):
    cfg = ModelConfig(**shape, init_std=0.03)
    torch.manual_seed(seed)
    eager = Emu3CausalLM(cfg, 283)
    with torch.device("meta"):
        model = Emu3CausalLM(cfg, 283)
    assert all(p.is_meta for p in model.parameters())  # building allocates nothing
    materialize(model, torch.device("cpu"), seed=seed)
    got = dict(model.named_parameters())
    for name, p in eager.named_parameters():
        assert torch.equal(got[name], p), name


def test_every_parameter_has_an_init_value():
    with torch.device("meta"):
        model = Emu3CausalLM(ModelConfig(num_layers=2, hidden_size=32, intermediate_size=64,
                                         num_heads=4, num_kv_heads=2), 100)
    names = [name for name, _ in init_values(model, seed=0)]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_materialize_without_seed_only_allocates():
    with torch.device("meta"):
        model = Emu3CausalLM(ModelConfig(num_layers=1, hidden_size=32, intermediate_size=64,
                                         num_heads=4, num_kv_heads=2), 100)
    materialize(model, torch.device("cpu"), seed=None)
    assert all(p.device.type == "cpu" and not p.is_meta for p in model.parameters())
