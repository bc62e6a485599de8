"""How long the step loop blocks on a checkpoint: background (async) vs synchronous saves.

Builds the model of a recipe (default: the demo's ``tiny``; ``--layers/--hidden`` to grow it),
takes one AdamW step so the optimizer state exists, then saves ``--repeats`` checkpoints each way
and measures the time until ``save()`` returns (what training waits for). The async writes are
drained outside the timed region. Also reports checkpoint bytes per parameter (model + AdamW).

    python benchmarks/checkpoint.py                      # tiny demo model
    python benchmarks/checkpoint.py --hidden 512 --layers 8

Ends with one JSON line: {"blocking_ratio": async_s / sync_s, "bytes_per_param": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

from emu3_train.checkpoint import CheckpointManager, TrainState, training_state
from emu3_train.config import ModelConfig, OptimConfig
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.optim import build_optimizer, build_scheduler


def _blocking_seconds(model, opt, sched, root: Path, async_save: bool, repeats: int) -> float:
    manager = CheckpointManager(root, async_save=async_save, keep_last=1)
    times = []
    for step in range(1, repeats + 1):
        t0 = time.perf_counter()
        manager.save(training_state(model, opt, sched, {"cursor": step}, TrainState(step)), {})
        times.append(time.perf_counter() - t0)
        manager.wait()  # not timed: the next step of a real run overlaps this
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=283)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    cfg = ModelConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_layers=args.layers,
                      num_heads=max(1, args.hidden // 32), num_kv_heads=max(1, args.hidden // 64))
    model = Emu3CausalLM(cfg, args.vocab)
    opt = build_optimizer(model, OptimConfig())
    sched = build_scheduler(opt, OptimConfig(), 10)
    tokens = torch.randint(0, args.vocab, (1, 64))
    cu_seqlens = torch.tensor([0, 64], dtype=torch.int32)
    model.logits(model(tokens, torch.arange(64)[None], cu_seqlens)).mean().backward()
    opt.step()
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        sync_s = _blocking_seconds(model, opt, sched, Path(tmp) / "sync", False, args.repeats)
        async_s = _blocking_seconds(model, opt, sched, Path(tmp) / "async", True, args.repeats)
        ckpt = next((Path(tmp) / "sync").glob("step_*"))
        size = sum(f.stat().st_size for f in ckpt.glob("*.distcp"))
    print(f"model: {n_params / 1e6:.2f}M parameters; checkpoint shards {size / 1e6:.1f} MB "
          f"= {size / n_params:.1f} bytes/parameter (fp32 weights + AdamW moments = 12 expected)")
    print(f"step loop blocked per save: sync {sync_s * 1e3:.1f} ms, async {async_s * 1e3:.1f} ms "
          f"-> ratio {async_s / sync_s:.2f}")
    print(json.dumps({"params": n_params, "sync_block_s": round(sync_s, 4),
                      "async_block_s": round(async_s, 4),
                      "blocking_ratio": round(async_s / sync_s, 3),
                      "bytes_per_param": round(size / n_params, 2)}))


if __name__ == "__main__":
    main()
