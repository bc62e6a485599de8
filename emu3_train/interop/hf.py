"""Export a checkpoint to a transformers ``Emu3ForCausalLM`` folder, and import one.

    python -m emu3_train.interop.hf export CKPT_DIR OUT_DIR [--dtype fp32|bf16] [--max-shard-gb 5]
    python -m emu3_train.interop.hf import HF_DIR CKPT_DIR

For example:

    python -m emu3_train.interop.hf export runs/demo/ckpt hf/demo                   # fp32, lossless
    python -m emu3_train.interop.hf export runs/demo/ckpt/step_000300 hf/demo16 --dtype bf16
    python -m emu3_train.interop.hf import hf/demo ckpt/from_hf
    python -m emu3_train.train experiment=demo checkpoint.init_from=ckpt/from_hf  # + printed model.*=
    python -m emu3_train.train experiment=demo checkpoint.init_from=hf/demo       # or the folder itself

``export`` reads a checkpoint -- a ``step_*`` directory, or a ``ckpt`` directory whose ``latest``
it follows -- written with any dp/cp/tp layout (DCP reshards it into one plain model on the CPU)
and writes ``config.json`` (an ``Emu3TextConfig``), ``generation_config.json`` and
``model.safetensors`` (``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json``
above ``--max-shard-gb``). Parameter names are unchanged (DESIGN.md §4). No tokenizer is written.

``import`` reads such a folder, or an ``Emu3ForConditionalGeneration`` one (``Emu3-Gen-hf``,
``Emu3-Chat-hf``: its text model is taken, the VQ-VAE dropped), and writes a weights-only
checkpoint for ``checkpoint.init_from``. Its ``meta.json`` holds the model config and the HF
special-token ids, so exporting it again gives the same folder (bit-identical weights).

Bad input (a missing folder, a tensor whose shape the config contradicts, a config our decoder
cannot represent) ends the CLI with one line ``error: ...`` naming the file, and exit code 2.

Scripts load an HF folder as our model with :func:`load_hf`:

    from emu3_train.interop.hf import load_hf
    model, model_cfg = load_hf("hf/demo")               # Emu3CausalLM, fp32, eval mode
    hidden = model(tokens, position_ids, cu_seqlens)     # [B, S, H]; packed rows as in training
    logits = model.logits(hidden)                        # [B, S, V]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import transformers
from safetensors.torch import save_file

from emu3_train.checkpoint import SIDE_FILES, CheckpointError, load_weights, resolve_checkpoint
from emu3_train.config import ConfigError, ModelConfig
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.vocab import PRESETS, get_vocab

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
# Emu3ForConditionalGeneration keys (both on-disk spellings) -> Emu3ForCausalLM keys; the rest
# (``vqmodel.*``) is the image tokenizer, not part of the decoder.
_MULTIMODAL_PREFIXES = (("model.text_model.", "model."), ("text_model.model.", "model."),
                        ("text_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))


class InteropError(ValueError):
    """A folder or checkpoint that cannot be converted; the message names the file."""


# -- config mapping ------------------------------------------------------------------------------
def to_hf_config(cfg: ModelConfig, vocab_size: int, special_ids: dict | None = None,
                 dtype: torch.dtype = torch.float32) -> transformers.Emu3TextConfig:
    """Our ``model`` section -> the ``Emu3TextConfig`` that ``Emu3ForCausalLM`` takes."""
    return transformers.Emu3TextConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_dropout=cfg.attention_dropout, initializer_range=cfg.init_std,
        tie_word_embeddings=False, architectures=["Emu3ForCausalLM"], dtype=dtype,
        **{k: (special_ids or {}).get(k) for k in SPECIAL_IDS},
    )


def from_hf_config(hf: transformers.Emu3TextConfig, name: str, file: Path) -> ModelConfig:
    """``Emu3TextConfig`` -> our ``model`` section (``vocab_size`` set); rejects what our decoder
    cannot represent, naming ``file``."""
    rope = dict(hf.rope_parameters or {})
    head_dim = getattr(hf, "head_dim", None)
    problems = [
        (hf.hidden_act != "silu", f"hidden_act={hf.hidden_act!r}: the decoder's MLP is SwiGLU (silu)"),
        (rope.get("rope_type", "default") != "default",
         f"rope_parameters.rope_type={rope.get('rope_type')!r}: only 'default' RoPE is supported"),
        (rope.get("partial_rotary_factor", 1.0) != 1.0,
         f"rope_parameters.partial_rotary_factor={rope.get('partial_rotary_factor')}: must be 1"),
        (head_dim not in (None, hf.hidden_size // hf.num_attention_heads),
         f"head_dim={head_dim}: must be hidden_size / num_attention_heads"),
        (bool(getattr(hf, "attention_bias", False)), "attention_bias=true: the decoder has no biases"),
        (bool(getattr(hf, "mlp_bias", False)), "mlp_bias=true: the decoder has no biases"),
    ]
    for bad, why in problems:
        if bad:
            raise InteropError(f"{file}: {why}")
    return ModelConfig(
        name=name, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        rope_theta=float(rope.get("rope_theta", hf.default_theta)),
        max_position_embeddings=hf.max_position_embeddings, rms_norm_eps=hf.rms_norm_eps,
        attention_dropout=float(hf.attention_dropout), init_std=hf.initializer_range,
    )


def hydra_overrides(cfg: ModelConfig) -> str:
    """The ``model.*`` overrides that make a training config build this model."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "rope_theta", "max_position_embeddings", "rms_norm_eps", "attention_dropout")
    return " ".join(f"model.{k}={getattr(cfg, k)}" for k in keys)


def _empty_model(cfg: ModelConfig, vocab_size: int, device="cpu") -> Emu3CausalLM:
    """Our plain model with uninitialized storage (no time spent on a random init)."""
    with torch.device("meta"):
        model = Emu3CausalLM(cfg, vocab_size)
    return model.to_empty(device=device)


# -- HF folder -> our model ----------------------------------------------------------------------
def read_hf_config(path: Path) -> tuple[transformers.Emu3TextConfig, bool]:
    """(text config, whether the folder is a multimodal ``Emu3ForConditionalGeneration``)."""
    file = path / CONFIG_NAME
    if not path.is_dir():
        raise InteropError(f"{path}: no such directory")
    if not file.is_file():
        raise InteropError(f"{file}: missing (not a transformers model folder)")
    try:
        raw = json.loads(file.read_text())
        model_type = raw.get("model_type")
        if model_type == "emu3_text_model":
            return transformers.Emu3TextConfig.from_dict(raw), False
        if model_type == "emu3":
            return transformers.Emu3Config.from_dict(raw).text_config, True
    except (ValueError, TypeError, AttributeError) as e:  # bad JSON or a field the schema rejects
        raise InteropError(f"{file}: {e}") from e
    raise InteropError(f"{file}: model_type={model_type!r} is not an Emu3 model "
                       "(expected 'emu3_text_model' or 'emu3')")


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise InteropError(f"{index}: not a safetensors index ({e})") from e
        return [path / name for name in dict.fromkeys(weight_map.values())]
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    raise InteropError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} (only safetensors weights are read)")


def _load_hf(path, device="cpu"):
    path = Path(path)
    hf, multimodal = read_hf_config(path)
    cfg = from_hf_config(hf, name=path.resolve().name, file=path / CONFIG_NAME)
    model = _empty_model(cfg, cfg.vocab_size, device)
    from emu3_train.interop.hf_load import load_hf_weights  # it builds on this module

    # strict: every parameter, nothing else, the shapes config.json implies; one tensor at a time
    dtype = load_hf_weights(path, model, target=CONFIG_NAME)
    return model.eval(), cfg, hf, dtype


def load_hf(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Emu3CausalLM, ModelConfig]:
    """An HF ``Emu3ForCausalLM`` (or ``Emu3ForConditionalGeneration``) folder as our model.

    Returns ``(model, model_config)``: an fp32 :class:`Emu3CausalLM` in eval mode holding exactly
    the folder's weights, and the ``model`` config section that builds it (``vocab_size`` set).
    ``model(tokens, position_ids, cu_seqlens) -> hidden [B, S, H]``; ``model.logits(hidden)``.
    """
    model, cfg, _, _ = _load_hf(path, device)
    return model, cfg


# -- checkpoint -> our model ---------------------------------------------------------------------
def load_checkpoint_model(path: str | os.PathLike) -> tuple[Emu3CausalLM, ModelConfig, dict]:
    """A checkpoint of any parallel layout as one plain CPU model, eval mode.

    Returns ``(model, model_config, meta)``: ``model_config`` from ``meta.json``'s
    ``config.model`` with ``vocab_size`` resolved (``model.vocab_size`` or the size of
    ``config.data.vocab``); ``meta`` is ``meta.json`` plus ``path`` (the resolved step directory)
    and ``special_ids`` (HF pad/bos/eos: those an import recorded, else the vocabulary's roles).
    """
    path = Path(path)
    if not path.exists():
        raise InteropError(f"{path}: no such checkpoint directory")
    step_dir = resolve_checkpoint(path)
    meta_file = step_dir / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
        config = meta.get("config") or {}
        known = {f.name for f in fields(ModelConfig)}
        cfg = ModelConfig(**{k: v for k, v in config["model"].items() if k in known})
        vocab = (config.get("data") or {}).get("vocab")
        vocab = get_vocab(vocab) if vocab is not None else None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InteropError(f"{meta_file}: no usable config ({type(e).__name__}: {e})") from e
    if cfg.vocab_size is None and vocab is None:
        raise InteropError(f"{meta_file}: config.model.vocab_size is null and there is no "
                           "config.data.vocab to take the size from")
    vocab_size = cfg.vocab_size or vocab.size
    if isinstance(meta.get("hf"), dict):  # an import recorded the folder's special-token ids
        meta["special_ids"] = {k: meta["hf"].get(k) for k in SPECIAL_IDS}
    elif vocab is not None:
        meta["special_ids"] = {"pad_token_id": vocab.pad, "bos_token_id": vocab.bos,
                               "eos_token_id": vocab.eos}
    cfg = replace(cfg, vocab_size=vocab_size, backend="torch", attn_impl="sdpa", recompute="none")
    model = _empty_model(cfg, vocab_size)
    load_weights(step_dir, model)  # DCP reshards whatever layout wrote it; shapes checked by name
    meta["path"] = str(step_dir)
    return model.eval(), cfg, meta


# -- writing -------------------------------------------------------------------------------------
def _check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InteropError(f"{target}: exists and is not empty; remove it or choose another directory")


def _staging_dir(target: Path) -> Path:
    """A fresh sibling ``.tmp_NAME`` of ``target``; refuses a non-empty ``target``."""
    _check_target(target)
    tmp = target.parent / f".tmp_{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, target: Path) -> Path:
    if target.is_dir():
        target.rmdir()  # empty (checked by _staging_dir)
    os.replace(tmp, target)
    return target


def _write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype,
                       max_shard_bytes: int) -> list[str]:
    """``model.safetensors``, or numbered shards + index when larger than ``max_shard_bytes``.
    Casts one shard at a time so peak memory is the model plus one shard."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    names = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, keys in zip(names, shards):
        save_file({k: tensors[k].detach().to(device="cpu", dtype=dtype).contiguous() for k in keys},
                  str(folder / file), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() for t in tensors.values()) * itemsize
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: file for file, keys in zip(names, shards) for k in keys}}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def save_hf(model: Emu3CausalLM, cfg: ModelConfig, out: str | os.PathLike, special_ids: dict | None = None,
            dtype: str = "fp32", max_shard_gb: float = 5.0) -> Path:
    """Write ``model`` as an HF ``Emu3ForCausalLM`` folder ``out`` (created atomically; it must
    not exist or be empty): ``config.json`` + safetensors in ``dtype`` (fp32 | bf16)."""
    if dtype not in DTYPES:
        raise InteropError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    out = Path(out)
    tmp = _staging_dir(out)
    vocab_size = model.lm_head.weight.shape[0]
    hf_config = to_hf_config(cfg, vocab_size, special_ids, DTYPES[dtype])
    hf_config.save_pretrained(tmp)
    transformers.GenerationConfig.from_model_config(hf_config).save_pretrained(tmp)  # eos for generate()
    _write_safetensors(model.state_dict(), tmp, DTYPES[dtype], int(max_shard_gb * 2**30))
    return _publish(tmp, out)


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp32",
              max_shard_gb: float = 5.0) -> Path:
    """Checkpoint (any layout) -> HF ``Emu3ForCausalLM`` folder ``out``. Returns ``out``."""
    _check_target(Path(out))  # fail before reading anything
    model, cfg, meta = load_checkpoint_model(ckpt)
    return save_hf(model, cfg, out, meta.get("special_ids"), dtype, max_shard_gb)


def _matching_preset(cfg: ModelConfig, special_ids: dict) -> str | None:
    for name in PRESETS:
        v = get_vocab(name)
        if v.size == cfg.vocab_size and [v.pad, v.bos, v.eos] == [special_ids.get(k) for k in SPECIAL_IDS]:
            return name
    return None


def import_hf(hf_dir: str | os.PathLike, ckpt_dir: str | os.PathLike) -> tuple[Path, ModelConfig]:
    """HF folder -> weights-only checkpoint ``ckpt_dir`` for ``checkpoint.init_from``.

    Writes DCP shards of ``{"model": state_dict}`` and the side files a checkpoint has
    (``meta.json`` with ``config.model``, and ``config.data.vocab`` when the vocabulary size and
    pad/bos/eos ids are those of a preset). Returns ``(ckpt_dir, model_config)``.
    """
    ckpt_dir = Path(ckpt_dir)
    _check_target(ckpt_dir)  # fail before reading anything
    model, cfg, hf, dtype = _load_hf(hf_dir)
    special = {k: getattr(hf, k, None) for k in SPECIAL_IDS}
    config = {"model": asdict(cfg)}
    if preset := _matching_preset(cfg, special):
        config["data"] = {"vocab": preset}
    tmp = _staging_dir(ckpt_dir)
    with warnings.catch_warnings():  # one process without a process group is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp))
    meta = {"step": 0, "tokens_seen": 0, "weights_only": True, "config": config,
            "imported_from": str(Path(hf_dir).resolve()),
            "hf": {**special, "dtype": str(dtype).removeprefix("torch.")},
            "git_sha": None,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    # the side files verify_checkpoint requires; weights only, so a run that starts from this
    # (checkpoint.init_from) keeps its own schedule, data stream and RNG: empty states
    for name in SIDE_FILES:
        if name.endswith(".json"):
            state = meta if name == "meta.json" else {}
            (tmp / name).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        else:
            torch.save({"cpu": torch.get_rng_state(), "cuda": torch.empty(0, dtype=torch.uint8)}, tmp / name)
    return _publish(tmp, ckpt_dir), cfg


# -- CLI -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emu3_train.interop.hf",
                                     description=__doc__.split("\nScripts")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="checkpoint -> HF Emu3ForCausalLM folder",
                         description=__doc__.splitlines()[2].strip())
    exp.add_argument("ckpt", metavar="CKPT_DIR", help="a step_* directory, or a ckpt dir (follows latest)")
    exp.add_argument("out", metavar="OUT_DIR", help="new (or empty) folder for config.json + safetensors")
    exp.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weight dtype (default: fp32)")
    exp.add_argument("--max-shard-gb", type=float, default=5.0,
                     help="split the safetensors into shards of at most this size (default: 5)")
    imp = sub.add_parser("import", help="HF Emu3 folder -> weights-only checkpoint for checkpoint.init_from",
                         description=__doc__.splitlines()[3].strip())
    imp.add_argument("hf_dir", metavar="HF_DIR", help="folder with config.json and *.safetensors")
    imp.add_argument("ckpt", metavar="CKPT_DIR", help="new (or empty) checkpoint directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            out = export_hf(args.ckpt, args.out, args.dtype, args.max_shard_gb)
            print(f"wrote {out} (Emu3ForCausalLM, {args.dtype}); load it with "
                  f"transformers.Emu3ForCausalLM.from_pretrained({str(out)!r})")
        else:
            ckpt, cfg = import_hf(args.hf_dir, args.ckpt)
            print(f"wrote {ckpt}; train from it with: checkpoint.init_from={ckpt} {hydra_overrides(cfg)}")
    except (InteropError, CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
