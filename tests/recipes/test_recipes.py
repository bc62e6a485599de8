"""Every shipped recipe composes through Hydra and validates; impossible ones are rejected by name."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from emu3_train.config import ConfigError, TrainConfig, validate
from emu3_train.parallel.dims import layout_of
from emu3_train.recipes import compose, recipes_dir
from emu3_train.vocab import get_vocab

RECIPES = recipes_dir()
GROUP_FILES = {g: sorted(p.stem for p in (RECIPES / g).glob("*.yaml"))
               for g in ("model", "data", "parallel", "experiment")}
NEEDS_PATH = ["data.path=/nonexistent/shards"]


INIT = ["checkpoint.init_from=/runs/stage1/ckpt/latest"]
# world sizes the multi-GPU recipes are meant for (validation checks the layout against them)
WORLD = {("parallel", "node8"): 8, ("parallel", "nodes"): 32, ("experiment", "stage2"): 64,
         ("experiment", "sft_i2t"): 64, ("experiment", "sft_chat"): 64, ("experiment", "dpo"): 64}
POST_TRAINING = ("qft", "sft_i2t", "sft_chat")  # continue an earlier stage: need init_from


def _overrides(group: str, name: str) -> list[str]:
    extra = NEEDS_PATH if (group == "data" and name == "shards") else []
    if group == "experiment" and name in ("stage1", "stage2"):
        extra = ["model=emu3_8b", "data=shards", *NEEDS_PATH, *(INIT if name == "stage2" else [])]
    if group == "experiment" and name in (*POST_TRAINING, "dpo"):
        extra = [*NEEDS_PATH, *INIT]
    if (group, name) in WORLD and group == "parallel":  # a cluster preset, with the stage-1 batch
        extra = ["experiment=stage1", "model=emu3_8b", "data=shards", *NEEDS_PATH]
    return [f"{group}={name}", *extra]


def test_every_recipe_file_is_covered():
    assert GROUP_FILES["model"] == ["emu3_1b", "emu3_8b", "tiny"]
    assert {"auto", "single", "node8", "nodes"} <= set(GROUP_FILES["parallel"])
    assert {"demo", "shards"} <= set(GROUP_FILES["data"])
    assert {"demo", "stage1", "stage2"} <= set(GROUP_FILES["experiment"])
    assert (RECIPES / "train.yaml").is_file()


@pytest.mark.parametrize("group,name", [(g, n) for g, names in GROUP_FILES.items() for n in names])
def test_recipe_composes_and_validates(group, name):
    cfg = compose(_overrides(group, name))
    assert isinstance(cfg, TrainConfig)
    validate(cfg, world_size=WORLD.get((group, name), 1), vocab_size=get_vocab(cfg.data.vocab).size)


def test_parallel_presets_reject_other_world_sizes():
    cfg = compose(_overrides("parallel", "node8"))
    with pytest.raises(ConfigError, match="world size 4"):
        validate(cfg, world_size=4)
    nodes = compose(_overrides("parallel", "nodes"))
    assert layout_of(nodes, 16).dp == 8  # dp takes what tp leaves


def test_emu3_1b_is_emu3_shaped_and_about_a_billion_in_the_blocks():
    from emu3_train.flops import layer_params, total_params

    m = compose(["model=emu3_1b"]).model
    e = compose(["model=emu3_8b"]).model
    assert m.hidden_size // m.num_heads == e.hidden_size // e.num_heads == 128
    assert m.num_heads // m.num_kv_heads == e.num_heads // e.num_kv_heads == 4
    assert (m.vocab_size, m.rope_theta) == (e.vocab_size, e.rope_theta)
    assert 0.9e9 < m.num_layers * layer_params(m) < 1.1e9
    assert 1.6e9 < total_params(m, m.vocab_size) < 1.8e9


def test_stage2_needs_its_stage1_weights():
    cfg = compose(["experiment=stage2", "data=shards", *NEEDS_PATH])
    with pytest.raises(ConfigError, match=r"checkpoint\.init_from is required"):
        validate(cfg, world_size=64)


def test_default_composition_is_the_demo_shape():
    cfg = compose([])
    assert cfg.model.name == "tiny" and cfg.data.vocab == "demo"


def test_emu3_8b_exact_numbers():
    m = compose(["model=emu3_8b"]).model
    assert (m.num_layers, m.hidden_size, m.intermediate_size) == (32, 4096, 14336)
    assert (m.num_heads, m.num_kv_heads, m.rope_theta, m.vocab_size) == (32, 8, 1e6, 184_622)


def test_stage_experiments():
    s1 = compose(_overrides("experiment", "stage1"))
    assert s1.data.seq_len == 5120 and s1.optim.lr == 5e-5 and s1.optim.min_lr_ratio == 0.0
    assert s1.loss.vision_weight == 0.5 and s1.model.name == "emu3_8b"
    assert s1.data.tasks == ["t2i", "i2t", "text"]  # no video in stage 1
    assert s1.model.attention_dropout == 0.1 and s1.optim.warmup_steps > 0
    s2 = compose(_overrides("experiment", "stage2"))
    assert s2.data.seq_len == 131_072 and s2.data.tasks == [] and s2.parallel.cp > 1
    assert s2.checkpoint.init_from
    demo = compose(["experiment=demo"])
    assert demo.eval.task == "digits" and demo.model.name == "tiny"
    accum = layout_of(demo, 1).grad_accum_steps(demo.data.global_batch_size, demo.data.micro_batch_size)
    assert accum * demo.data.micro_batch_size == demo.data.global_batch_size


def test_post_training_recipes_continue_an_earlier_stage():
    for name in (*POST_TRAINING, "demo_chat"):
        cfg = compose(_overrides("experiment", name))
        assert cfg.checkpoint.init_required, name
    for name in POST_TRAINING:
        cfg = compose(["experiment=" + name, *NEEDS_PATH])
        assert cfg.model.name == "emu3_8b" and cfg.data.vocab == "emu3", name
        with pytest.raises(ConfigError, match=r"checkpoint\.init_from is required"):
            validate(cfg, world_size=WORLD.get(("experiment", name), 1))
    qft, i2t, chat = (compose(_overrides("experiment", n)) for n in POST_TRAINING)
    assert qft.data.tasks == ["t2i"] and qft.data.seq_len >= 90 * 91 + 16  # a 720x720 image fits
    assert i2t.data.tasks == ["i2t", "text"] and i2t.loss.task_weights["t2i"] == 0
    assert i2t.data.seq_len >= 128 * 129 + 16 and chat.data.seq_len == i2t.data.seq_len  # 1024^2 fits
    demo = compose(["experiment=demo_chat"])
    assert demo.checkpoint.init_from == "runs/demo-stage1/ckpt/latest"
    assert demo.data.path == "data/demo_chat/train" and demo.eval.task == "none"


def test_command_line_beats_experiment_defaults():
    assert compose(["experiment=demo", "model=emu3_8b"]).model.name == "emu3_8b"


def test_unknown_override_is_rejected_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="data.bogus"):
        compose(["data.bogus=1"])


def test_missing_shard_path_is_reported():
    with pytest.raises(ConfigError, match=r"data\.path is required"):
        compose(["data=shards"])


@pytest.mark.parametrize("override,field", [
    ("model.num_kv_heads=3", "model.num_heads"),
    ("model.hidden_size=130", "model.hidden_size"),
    ("data.global_batch_size=3", "data.global_batch_size"),
    ("data.seq_len=0", "data.seq_len"),
    ("model.vocab_size=100", "model.vocab_size"),
    ("model.attn_impl=bogus", "model.attn_impl"),
    ("model.backend=te", "model.backend"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.lr=0", "optim.lr"),
    ("parallel.tp=2", "parallel"),
    ("data.seq_len=200000", "data.seq_len"),
])
def test_impossible_configs_name_the_field(override, field):
    cfg = compose(["experiment=demo", override])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(cfg, world_size=1, vocab_size=get_vocab(cfg.data.vocab).size)


def test_world_size_must_match_layout():
    cfg = compose(["experiment=demo", "parallel=single"])
    with pytest.raises(ConfigError, match="world size 2"):
        validate(cfg, world_size=2)


def test_recipes_dir_is_the_checkout():
    assert RECIPES == Path(__file__).resolve().parents[2] / "recipes"


def test_dpo_recipes_select_the_objective_and_need_their_weights():
    for name in ("dpo", "demo_dpo"):
        with pytest.raises(ConfigError, match=r"checkpoint\.init_from is required"):
            validate(compose([f"experiment={name}", *NEEDS_PATH, "checkpoint.init_from=null"]), 64)
    dpo = compose(_overrides("experiment", "dpo"))
    assert dpo.loss.objective == "dpo" and dpo.dpo.reference == "precomputed" and dpo.dpo.ntp_weight > 0
    demo = compose(["experiment=demo_dpo"])
    assert demo.loss.objective == "dpo" and demo.checkpoint.init_from == "runs/demo-stage1/ckpt/latest"
    with pytest.raises(ConfigError, match="dpo.reference=frozen copies checkpoint.init_from"):
        validate(compose(["experiment=demo", "loss.objective=dpo", "dpo.reference=frozen"]))
