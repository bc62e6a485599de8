#!/usr/bin/env bash
# Launch `python -m emu3_train.train` under torchrun: one process per GPU (or per CPU slot with gloo).
# Everything after the process count is a Hydra override for emu3_train.train.
#
# One node, 8 GPUs:
#   launch/torchrun.sh 8 experiment=stage1 model=emu3_8b data=shards data.path=/shards parallel.tp=2
# Several nodes by hand: the same command on every node, NODE_RANK 0..NNODES-1, c10d rendezvous on
# MASTER_ADDR:MASTER_PORT (a node all others can reach, normally the one with NODE_RANK=0):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh 8 experiment=stage1 ...
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh 8 experiment=stage1 ...
# Under slurm (calls this script once per node):
#   sbatch --nodes 4 launch/slurm.sbatch experiment=stage1 model=emu3_8b data=shards data.path=/shards
# From make:  make pretrain-stage1 NNODES=2 GPUS_PER_NODE=8 NODE_RANK=0 MASTER_ADDR=node0 ...
#
# The run directory (out_dir/run_name, run_name + $RUN_SUFFIX) is composed from the overrides
# before launching, so every node agrees on it; each rank's stdout/stderr go to
#   <run dir>/logs/node<NODE_RANK>/<rdzv id>_<random>/attempt_<n>/<local rank>/{stdout,stderr}.log
# and to this console, prefixed with the global rank ("[rank3]: ...").
# Note: with c10d rendezvous, global ranks follow the order in which nodes joined, not NODE_RANK.
#
# Environment (defaults in brackets):
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [unset: single-node --standalone]  MASTER_PORT [29500]
#   RDZV_ID [emu3-<run name>]    the same on every node of one job
#   RUN_SUFFIX []                appended to run_name (slurm.sbatch: -<job id>)
#   OMP_NUM_THREADS [CPUs of this node / processes per node, at least 1]
#   SHUTDOWN_TIMEOUT [300]       on SIGTERM/SIGINT torchrun forwards the signal to every rank and
#                                SIGKILLs the ranks still alive after this many seconds (torchrun's own
#                                default is 30). Our ranks finish the step and write a checkpoint
#                                first (see emu3_train/trainer.py), so leave room for a large save.
#                                (When a rank fails, torchrun stops the others with a fixed 30 s.)
#   LOCAL_RANKS_FILTER [all]     console shows only these local ranks, e.g. 0 (log files keep all)
#   PY [.venv/bin/python]
# torchrun itself exits non-zero after a signal even when every rank checkpointed and exited 0.
#
# NCCL / PyTorch distributed knobs (set them in the environment; only NCCL_DEBUG gets a default):
#   NCCL_DEBUG=WARN              INFO prints topology/transport choices (useful once, very verbose)
#   NCCL_SOCKET_IFNAME=ib0,eth0  interface(s) for NCCL bootstrap/socket traffic on multi-NIC nodes;
#   GLOO_SOCKET_IFNAME=eth0      the same for gloo (CPU runs, some store traffic)
#   NCCL_IB_HCA=mlx5_0,mlx5_1    which InfiniBand/RoCE HCAs to use (cluster-specific)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING  torch's default (3) tears the process down when the NCCL
#                                watchdog sees an error or a collective timeout (parallel.timeout_s),
#                                so torchrun notices and stops the job; keep it
#   TORCH_NCCL_BLOCKING_WAIT=1   makes work.wait() block and raise on timeout in the calling thread
#                                (debugging only; costs performance)
#   TORCH_NCCL_DUMP_ON_TIMEOUT=1 + TORCH_NCCL_TRACE_BUFFER_SIZE=2000: flight recorder dump on a hang
#   CUDA_DEVICE_MAX_CONNECTIONS=1  needed only by Megatron-style TP comm/compute overlap; FSDP2 and
#                                torch TP here do not need it (it can serialize overlap), so unset
set -euo pipefail

usage="usage: [NNODES=N NODE_RANK=i MASTER_ADDR=host] launch/torchrun.sh NPROC_PER_NODE [hydra overrides...]"
NPROC=${1:?$usage}
shift
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || { echo "$usage (NPROC_PER_NODE must be a positive integer)" >&2; exit 2; }
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NNODES=${NNODES:-1}
if [[ $NNODES -gt 1 ]]; then
  : "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on every node}" "${MASTER_ADDR:?set MASTER_ADDR for NNODES>1}"
fi
NODE_RANK=${NODE_RANK:-0}

# One run_name for every node: the composed one (+ suffix) replaces any run_name= given.
overrides=()
for arg in "$@"; do
  case $arg in
    run_name=* | +run_name=* | ++run_name=*) ;;
    *) overrides+=("$arg") ;;
  esac
done
names=$("$PY" -m emu3_train.recipes run-dir --suffix="${RUN_SUFFIX:-}" -- "$@")
RUN_NAME=${names%%$'\n'*}
RUN_DIR=${names#*$'\n'}
overrides+=("run_name=$RUN_NAME")

cpus=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / NPROC > 0 ? cpus / NPROC : 1))}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# shellcheck disable=SC2016  # ${rank} is torchrun's template variable, not a shell expansion
export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE=${TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE:-'[rank${rank}]: '}

args=(--nproc-per-node "$NPROC" --log-dir "$RUN_DIR/logs/node$NODE_RANK" --tee 3
      --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}")
if [[ -n ${LOCAL_RANKS_FILTER:-} ]]; then
  args+=(--local-ranks-filter "$LOCAL_RANKS_FILTER")
fi
if [[ $NNODES -eq 1 && -z ${MASTER_ADDR:-} ]]; then
  args+=(--standalone)
else
  rdzv_id=${RDZV_ID:-emu3-$RUN_NAME}
  # no --node-rank: c10d rendezvous ignores it (ranks follow join order); NODE_RANK names the log folder
  args+=(--nnodes "$NNODES" --rdzv-backend c10d
         --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}"
         --rdzv-id "${rdzv_id//[^A-Za-z0-9_.-]/_}")
fi
echo "launch: node $NODE_RANK/$NNODES, $NPROC processes, OMP_NUM_THREADS=$OMP_NUM_THREADS, run dir $RUN_DIR" >&2
exec "$PY" -m torch.distributed.run "${args[@]}" -m emu3_train.train "${overrides[@]}"
