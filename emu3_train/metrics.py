"""Metrics: one console summary line per log interval, and wandb (offline by default).

Keys follow DESIGN.md §4 (``train/loss``, ``perf/tokens_per_s``, ``data/fill``, ...). With
``wandb.mode=offline`` (default) wandb writes to ``<run_dir>/wandb`` and opens no connection;
``disabled`` logs to the console only; ``online`` syncs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from emu3_train.config import WandbConfig


def format_summary(step: int, max_steps: int, m: dict) -> str:
    """The one-line summary, e.g. ``step 40/300 | loss 2.3142 | text 1.9021 | vision 2.5114 | ...``."""
    def f(key, fmt):
        v = m.get(key)
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    return (f"step {step}/{max_steps} | loss {f('train/loss', '.4f')} | text {f('train/loss_text', '.4f')}"
            f" | vision {f('train/loss_vision', '.4f')} | lr {f('train/lr', '.2e')}"
            f" | gnorm {f('train/grad_norm', '.2f')} | tok/s {f('perf/tokens_per_s', ',.0f')}"
            f" | fill {f('data/fill', '.2f')}")


class MetricLogger:
    """Sends metric dicts to wandb (rank 0 only) and keeps the last values for the summary."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, run_name: str, config: dict, enabled: bool):
        self.run = None
        if not enabled or cfg.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=run_name, dir=str(run_dir),
                              mode=cfg.mode, config=config, reinit="finish_previous")

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, caption: str, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
