#!/usr/bin/env bash
# Launch training on this node with torchrun: one process per GPU (or per CPU slot with gloo).
#
#   launch/torchrun.sh 8 experiment=stage1 model=emu3_8b data=shards data.path=/shards parallel.tp=2
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh 8 experiment=stage1 ...   # on each node
#
# Everything after the process count is a Hydra override for `python -m emu3_train.train`.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC [hydra overrides...]}
shift
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NNODES=${NNODES:-1}
if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m emu3_train.train "$@"
fi
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}" \
  --nproc-per-node "$NPROC" --rdzv-backend c10d \
  --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
  --rdzv-id "${RDZV_ID:-emu3-train}" -m emu3_train.train "$@"
