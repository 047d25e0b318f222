#!/usr/bin/env bash
# Multi-node (or single-node) launch of `omni train` with torchrun and c10d rendezvous.
#
#   # node 0 (10.0.0.1) and node 1 of a 2-node x 2-process job:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=2 launch/torchrun.sh recipes/tiny_omni.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=2 launch/torchrun.sh recipes/tiny_omni.yaml
#
# Environment (defaults: one node, NPROC_PER_NODE from the recipe is NOT read here, so set it):
#   NNODES           number of nodes (1)
#   NODE_RANK        this node's index, 0..NNODES-1 (0)
#   MASTER_ADDR      address of node 0, reachable from every node (127.0.0.1)
#   MASTER_PORT      free TCP port on node 0 for the rendezvous (29500)
#   NPROC_PER_NODE   processes (ranks) per node (1)
#   MAX_RESTARTS     torchrun restarts of the whole job after a rank dies (0); each restart resumes from the
#                    latest valid checkpoint
# All arguments go to `omni train` (recipe, key=value overrides). The run must see the same output_dir on every node
# (a shared filesystem): stage markers, checkpoints and exported models live there.
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"

if [ "$#" -lt 1 ]; then
    sed -n '2,20p' "$0" >&2
    exit 2
fi
# CPU ranks sharing a node's cores: one thread each unless the caller chose otherwise
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

exec python -m torch.distributed.run \
    --nnodes="${NNODES}" --node_rank="${NODE_RANK}" --nproc_per_node="${NPROC_PER_NODE}" \
    --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv_id="omni-${MASTER_PORT}" \
    --max-restarts="${MAX_RESTARTS}" \
    -m omni.cli train "$@"
