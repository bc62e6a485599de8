"""Every numeric field of the schema has a valid range (config.RANGES) that ``validate()`` checks first,
so a value that would make every step NaN, or fail inside torch without the field's name, ends the run
with one line naming the field."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from emu3_train.config import RANGES, ConfigError, TrainConfig, validate
from emu3_train.recipes import compose
from emu3_train.vocab import get_vocab


def _numeric_fields(cls=TrainConfig, prefix="") -> dict[str, type]:
    """Dotted name -> int | float of every numeric leaf of the schema, found by introspection."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, name = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            out.update(_numeric_fields(hint, f"{name}."))
            continue
        kinds = set(typing.get_args(hint)) if typing.get_args(hint) else {hint}
        kinds.discard(type(None))
        if kinds and kinds <= {int, float} and bool not in kinds:
            out[name] = float if float in kinds else int
    return out


NUMERIC = _numeric_fields()


def _bad_values(name: str, kind: type) -> list:
    r = RANGES[name]
    bad = []
    if r.low > -math.inf:
        bad.append(r.low if not r.low_inclusive else (r.low - 1 if kind is int else r.low - 0.5))
    if r.high < math.inf:
        bad.append(r.high if not r.high_inclusive else (r.high + 1 if kind is int else r.high + 0.5))
    if kind is float:
        bad.append(math.nan)
    return bad


def test_numeric_fields_are_found():
    # guard for the introspection: known fields of every kind are seen
    assert {"model.rms_norm_eps", "model.vocab_size", "optim.beta1", "data.seq_len",
            "sample.temperature", "checkpoint.keep_last"} <= set(NUMERIC)
    assert "trainer.compile" not in NUMERIC and "parallel.dp" not in NUMERIC  # bool; int | 'auto'


def test_every_numeric_field_has_a_range():
    missing = sorted(set(NUMERIC) - set(RANGES))
    assert not missing, f"add a range to config.RANGES for {missing}"
    assert not set(RANGES) - set(NUMERIC), "config.RANGES names a field the schema does not have"


def test_every_range_rejects_something():
    for name, kind in NUMERIC.items():
        assert _bad_values(name, kind), name


def test_defaults_and_recipe_values_are_in_range():
    for cfg in (TrainConfig(), compose(["experiment=demo"])):
        for name in RANGES:
            section, leaf = name.split(".")
            value = getattr(getattr(cfg, section), leaf)
            assert value is None or RANGES[name].contains(value), (name, value)


@pytest.mark.parametrize("name,value", [(n, v) for n, k in NUMERIC.items() for v in _bad_values(n, k)])
def test_out_of_range_value_is_rejected_naming_the_field(name, value):
    cfg = compose(["experiment=demo", "data.path=/unused"])
    section, leaf = name.split(".")
    setattr(getattr(cfg, section), leaf, value)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=1, vocab_size=get_vocab(cfg.data.vocab).size)
    message = str(e.value)
    assert message.startswith(f"{name} must be") and "\n" not in message, message
    assert str(RANGES[name]) in message


@pytest.mark.parametrize("override", ["model.rms_norm_eps=-1", "optim.weight_decay=-1", "model.init_std=-1",
                                      "optim.beta1=2", "optim.eps=-1", "optim.beta2=1", "loss.z_loss=-0.1",
                                      "sample.temperature=-1", "eval.top_k=-1", "model.vocab_size=0"])
def test_issue_examples_through_overrides(override):
    cfg = compose(["experiment=demo", override])
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{field.replace('.', r'[.]')} must be"):
        validate(cfg, world_size=1, vocab_size=get_vocab(cfg.data.vocab).size)


def test_range_text():
    assert str(RANGES["optim.beta1"]) == "in [0, 1)"
    assert str(RANGES["data.seq_len"]) == ">= 1"
    assert str(RANGES["optim.eps"]) == "> 0"
