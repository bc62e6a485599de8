"""One model for inference from any SOURCE: a run's checkpoint or a Hugging Face folder.

SOURCE is a run's ``ckpt`` folder, its ``ckpt/latest`` or a ``ckpt/step_N`` folder (saved with any
dp/cp/tp layout: DCP reshards it into one plain model), or a folder written by
``python -m emu3_train.interop.hf export`` (or transformers' ``Emu3ForCausalLM`` /
``Emu3ForConditionalGeneration``, whose text model is taken). Tools that run a trained model on
one process (``python -m emu3_train.evaluate``, a ``generate`` CLI) start here:

    from emu3_train.model_source import load_model
    src = load_model("runs/demo-stage1/ckpt/latest", device="cpu")    # or load_model("hf/demo")
    src.model          # Emu3CausalLM, fp32, eval mode, on `device`
    src.model_config   # its ModelConfig (vocab_size set; attn_impl sdpa, no recompute)
    src.vocab          # the Vocab preset the weights were trained with, or None if unknown
    src.config         # the run's resolved config dict (meta.json "config"); {} for an HF folder
    src.step           # optimizer steps of the checkpoint; None for an HF folder
    hidden = src.model(tokens, position_ids, cu_seqlens)      # [B, S, H]; logits: src.model.logits

A SOURCE that cannot be loaded raises :class:`ModelSourceError` (a ``ConfigError``: exit 2 in
CLIs) with one line naming the path: it does not exist, is neither a checkpoint nor an HF folder,
is an incomplete checkpoint, an HF folder our decoder cannot represent, or holds tensors of other
names or shapes than its own config describes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from emu3_train.config import ConfigError, ModelConfig
from emu3_train.vocab import PRESETS, Vocab, get_vocab

USAGE = ("pass a run's ckpt folder, its ckpt/latest, a ckpt/step_N folder, or a Hugging Face folder "
         "(python -m emu3_train.interop.hf export)")


class ModelSourceError(ConfigError):
    """SOURCE cannot be loaded as a model; one line naming the path."""


@dataclass
class LoadedModel:
    """A model ready for inference and what is known about it (module docstring)."""

    model: torch.nn.Module
    model_config: ModelConfig
    vocab: Vocab | None
    path: Path  # the resolved step directory, or the HF folder
    kind: str  # "checkpoint" | "hf"
    step: int | None = None
    config: dict = field(default_factory=dict)


def _preset(vocab_size: int, ids: dict) -> Vocab | None:
    """The vocabulary preset of this size whose pad/bos/eos match ``ids`` (HF config fields)."""
    for name in PRESETS:
        v = get_vocab(name)
        if v.size == vocab_size and all(ids.get(k) in (None, want) for k, want in
                                        (("pad_token_id", v.pad), ("bos_token_id", v.bos),
                                         ("eos_token_id", v.eos))):
            return v
    return None


def _load_hf(path: Path, device) -> LoadedModel:
    from emu3_train.interop.hf import InteropError, load_hf

    try:
        model, cfg = load_hf(path, device)
        raw = json.loads((path / "config.json").read_text())
    except InteropError as e:
        raise ModelSourceError(f"{path}: not an Emu3 model folder our decoder can load: {e}") from e
    except ConfigError as e:  # WeightsMismatchError: tensors other than config.json describes
        raise ModelSourceError(str(e)) from e
    text = raw.get("text_config", raw) if raw.get("model_type") == "emu3" else raw
    return LoadedModel(model, cfg, _preset(cfg.vocab_size, text), path, "hf")


def _load_checkpoint(path: Path, device) -> LoadedModel:
    from emu3_train.checkpoint import CheckpointError
    from emu3_train.interop.hf import InteropError, load_checkpoint_model

    try:
        model, cfg, meta = load_checkpoint_model(path)
    except (CheckpointError, InteropError) as e:
        raise ModelSourceError(f"{path}: not a loadable checkpoint: {e}; {USAGE}") from e
    except ConfigError as e:  # WeightsMismatchError
        raise ModelSourceError(str(e)) from e
    config = meta.get("config") or {}
    vocab_name = (config.get("data") or {}).get("vocab")
    vocab = get_vocab(vocab_name) if vocab_name in PRESETS else None
    return LoadedModel(model.to(device), cfg, vocab, Path(meta["path"]), "checkpoint",
                       int(meta.get("step", 0)), config)


def load_model(source: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of ``source`` (module docstring) on ``device``, fp32, eval mode."""
    from emu3_train.checkpoint import is_hf_folder

    path = Path(source)
    if not path.exists():
        raise ModelSourceError(f"{path}: does not exist; {USAGE}")
    if is_hf_folder(path) or (path / "config.json").is_file():
        return _load_hf(path, torch.device(device))
    return _load_checkpoint(path, torch.device(device))
