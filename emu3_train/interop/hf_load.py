"""Fill this rank's (possibly sharded) parameters straight from a Hugging Face folder.

``checkpoint.init_from=HF_DIR`` takes a folder written by ``python -m emu3_train.interop.hf
export`` or by transformers (``Emu3ForCausalLM``, or the text model of an
``Emu3ForConditionalGeneration``): ``config.json`` + ``model.safetensors`` or sharded
``model-0000K-of-0000N.safetensors`` with ``model.safetensors.index.json``. No conversion step:

    with torch.device("meta"):
        model = Emu3CausalLM(cfg.model, vocab_size)
    parallelize(...); materialize(model, device, seed=None)
    load_hf_weights("hf/demo", model)     # what build_model(..., weights="hf/demo") does

Before any tensor is read, ``config.json`` is checked against the model (every field that changes
the weights' meaning: vocabulary, widths, layers, heads, RoPE theta, norm epsilon) and the
folder's key set and shapes against the model's, both ways; each failure is one line naming the
file and the ``model.*`` setting to change. Then each parameter is read on its own, in the
folder's dtype, and cast to the parameter's: a plain parameter gets the whole tensor; a DTensor
sharded as a plain ``Shard(0)`` on a 1-D mesh (FSDP2 alone) reads only its own rows
(``safe_open(...).get_slice``); any other layout reads the one full tensor and keeps its slice
(:func:`emu3_train.model.init.copy_full_value`). Peak host memory: the local shards plus one
full parameter.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.tensor import DTensor, Shard

from emu3_train.config import ModelConfig
from emu3_train.interop.hf import (
    _MULTIMODAL_PREFIXES,
    CONFIG_NAME,
    INDEX_NAME,
    InteropError,
    _weight_files,
    from_hf_config,
    read_hf_config,
)
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.model.init import copy_full_value
from emu3_train.weights import WeightsMismatchError, check_fit

# (our model.* field, HF config.json name)
_FIELDS = (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
           ("intermediate_size", "intermediate_size"), ("num_layers", "num_hidden_layers"),
           ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
           ("rope_theta", "rope_parameters.rope_theta"), ("rms_norm_eps", "rms_norm_eps"))


def check_hf_folder(path: str | os.PathLike) -> ModelConfig:
    """The ``model`` section an HF folder's ``config.json`` describes (``vocab_size`` set), after
    checking that our decoder can represent it and that its weight files exist. Reads no tensor;
    raises :class:`InteropError` naming the file."""
    path = Path(path)
    hf, _ = read_hf_config(path)
    cfg = from_hf_config(hf, name=path.resolve().name, file=path / CONFIG_NAME)
    for file in _weight_files(path):
        if not file.is_file():
            raise InteropError(f"{file}: missing (listed in {INDEX_NAME})")
    return cfg


def model_config_of(model: Emu3CausalLM) -> dict:
    """The ``model.*`` values ``model`` was built with, read from its (global) parameter shapes, so
    a TP- or FSDP-sharded model answers as the plain one."""
    decoder = model.model
    head_dim = decoder.head_dim
    embed = decoder.embed_tokens.weight
    values = {"vocab_size": embed.shape[0], "hidden_size": embed.shape[1], "num_layers": len(decoder.layers),
              "rope_theta": float(decoder.rope_theta), "rms_norm_eps": decoder.norm.eps}
    if decoder.layers:
        layer = decoder.layers[0]
        values.update(intermediate_size=layer.mlp.gate_proj.weight.shape[0],
                      num_heads=layer.self_attn.q_proj.weight.shape[0] // head_dim,
                      num_kv_heads=layer.self_attn.k_proj.weight.shape[0] // head_dim)
    return values


def _check_config(path: Path, cfg: ModelConfig, model: Emu3CausalLM) -> None:
    ours = model_config_of(model)
    diffs = [(field, hf_name, getattr(cfg, field), ours[field]) for field, hf_name in _FIELDS
             if field in ours and getattr(cfg, field) != ours[field]]
    if diffs:
        said = ", ".join(f"{hf_name}={theirs} but model.{field}={mine}"
                         for field, hf_name, theirs, mine in diffs)
        fix = " ".join(f"model.{field}={theirs}" for field, _, theirs, _ in diffs)
        raise WeightsMismatchError(f"{path / CONFIG_NAME}: describes another model than this one "
                                   f"({said}); set {fix}")


def _hf_index(path: Path, multimodal: bool) -> dict[str, tuple[Path, str, list[int]]]:
    """``{our parameter name: (file, key in it, shape)}`` of the folder, from the file headers."""
    out = {}
    for file in _weight_files(path):
        if not file.is_file():
            raise InteropError(f"{file}: missing (listed in {INDEX_NAME})")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    name = key
                    if multimodal:  # keep the text model, drop the VQ-VAE
                        name = next((new + key[len(old):] for old, new in _MULTIMODAL_PREFIXES
                                     if key.startswith(old)), None)
                        if name is None:
                            continue
                    out[name] = (file, key, list(f.get_slice(key).get_shape()))
        except SafetensorError as e:
            raise InteropError(f"{file}: unreadable safetensors file ({e})") from e
    return out


def _local_rows(param: DTensor) -> tuple[int, int] | None:
    """``(start, stop)`` rows of the full tensor this rank holds when ``param`` is a plain
    ``Shard(0)`` on a 1-D mesh (torch.chunk's split, as DTensor shards), else None."""
    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        return None
    rows, parts = param.shape[0], param.device_mesh.size()
    chunk = -(-rows // parts)
    start = min(param.device_mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    local = param.to_local().shape
    return (start, stop) if list(local) == [stop - start, *param.shape[1:]] else None


@torch.no_grad()
def _fill(param: torch.Tensor, f, key: str) -> torch.dtype | None:
    """Copy the folder's tensor ``key`` into ``param`` (its rows only, when it can); returns the
    dtype the folder stores it in (None when this rank holds no rows of it)."""
    rows = _local_rows(param) if isinstance(param, DTensor) else None
    if rows is None:
        full = f.get_tensor(key)
        copy_full_value(param, full.to(device=param.device, dtype=param.dtype))
        return full.dtype
    start, stop = rows
    if stop == start:
        return None
    local = param.to_local()
    part = f.get_slice(key)[start:stop]
    local.copy_(part.to(device=local.device, dtype=local.dtype))
    return part.dtype


def load_hf_weights(path: str | os.PathLike, model: Emu3CausalLM, target: str = "this model") -> torch.dtype:
    """Fill every parameter of ``model`` (plain or DTensor shards, on any device) from the HF
    folder ``path``; every rank calls it on its own (no communication). Returns the dtype the
    folder stores (fp32 when this rank read nothing). Raises
    :class:`~emu3_train.weights.WeightsMismatchError` when the folder's config or tensors differ
    from the model's (``target`` names the model in the message), :class:`InteropError` for an
    unreadable folder."""
    path = Path(path)
    hf, multimodal = read_hf_config(path)
    _check_config(path, from_hf_config(hf, name=path.resolve().name, file=path / CONFIG_NAME), model)
    index = _hf_index(path, multimodal)
    params = dict(model.named_parameters())
    if "lm_head.weight" not in index and hf.tie_word_embeddings and "model.embed_tokens.weight" in index:
        index["lm_head.weight"] = index["model.embed_tokens.weight"]  # tied: the table is stored once
    check_fit(path, {k: p.shape for k, p in params.items()}, {k: v[2] for k, v in index.items()},
              what="the folder", target=target)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, key, _) in index.items():
        by_file.setdefault(file, []).append((name, key))
    dtype = torch.float32
    for file, entries in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                for name, key in entries:
                    dtype = _fill(params[name], f, key) or dtype
        except SafetensorError as e:
            raise InteropError(f"{file}: unreadable safetensors file ({e})") from e
    return dtype
