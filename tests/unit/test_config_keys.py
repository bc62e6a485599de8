"""Keys the schema does not define are rejected, also when added with ``+``, naming the key and the
closest defined one; hydra keys and group selections (``+experiment=...`` too) keep working."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from emu3_train.config import ConfigError
from emu3_train.recipes import check_overrides, compose, run_dir, to_config, unknown_key


@pytest.mark.parametrize("override,key,suggestion", [
    ("+trainer.max_stepz=3", "trainer.max_stepz", "trainer.max_steps"),
    ("++trainer.max_stepz=3", "trainer.max_stepz", "trainer.max_steps"),
    ("+optim.weight_dekay=0.1", "optim.weight_dekay", "optim.weight_decay"),
    ("+trainer.lr=1", "trainer.lr", "optim.lr"),  # the right name in another section
    ("+foo=1", "foo", None),
    ("+modle.hidden_size=8", "modle.hidden_size", "model.hidden_size"),
])
def test_added_unknown_key_is_rejected(override, key, suggestion):
    with pytest.raises(ConfigError) as e:
        compose(["experiment=demo", override])
    message = str(e.value)
    assert key in message and "\n" not in message, message
    if suggestion:
        assert f"did you mean {suggestion}?" in message
    else:
        assert "did you mean" not in message


def test_unknown_key_without_plus_does_not_recommend_plus():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["trainer.max_stepz=3"])
    message = str(e.value)
    assert message.startswith("Could not override 'trainer.max_stepz'")
    assert "did you mean trainer.max_steps?" in message and "+" not in message and "\n" not in message
    with pytest.raises(ConfigError, match="did you mean trainer.max_steps"):
        check_overrides(["trainer.max_stepz=3"])  # what the CLI reports (train.py)


def test_run_dir_rejects_added_unknown_keys():
    with pytest.raises(ConfigError, match="trainer.bogus"):
        run_dir(["+trainer.bogus=1"])


def test_to_config_rejects_keys_outside_the_schema():
    # the composed config itself is checked too, whatever added the key
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from emu3_train.config import register_configs
    from emu3_train.recipes import recipes_dir

    register_configs()
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        dcfg = hydra_compose(config_name="train", overrides=["experiment=demo"])
    added = dcfg.copy()
    OmegaConf.update(added, "trainer.max_stepz", 3, force_add=True)  # as Hydra does for +trainer...
    with pytest.raises(ConfigError, match=r"trainer\.max_stepz.*did you mean trainer\.max_steps\?"):
        to_config(added)
    dcfg.data.path = "/s"
    assert to_config(dcfg).trainer.max_steps == 2400


@pytest.mark.parametrize("overrides", [
    ["hydra.run.dir=/tmp/x", "hydra.output_subdir=null", "hydra/job_logging=stdout",
     "hydra/hydra_logging=disabled", "+hydra.job.env_set.FOO=1"],
    ["experiment=demo", "model=emu3_1b", "data=shards", "data.path=/s", "parallel=single"],
    ["++trainer.max_steps=3", "trainer.fault=null", "data.blend=[]", "~checkpoint.dir"],
])
def test_defined_keys_and_groups_are_accepted(overrides):
    assert check_overrides(overrides) == overrides


def test_plus_on_a_default_group_selects_it():
    # documented for the planner ("+experiment=stage1"); training takes it the same way
    base = ["model=emu3_8b", "data=shards", "data.path=/s"]
    assert check_overrides(["+experiment=stage1", *base]) == ["experiment=stage1", *base]
    assert compose(["+experiment=stage1", *base]) == compose(["experiment=stage1", *base])


def test_unknown_key_lookup():
    assert unknown_key("trainer.max_steps") is None and unknown_key("run_name") is None
    assert unknown_key("data.blend") is None
    assert "did you mean data.seq_len?" in unknown_key("data.seqlen")
    assert unknown_key("model") is None  # a section
