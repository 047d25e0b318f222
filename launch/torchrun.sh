#!/usr/bin/env bash
# Single- or multi-node launch of `omni train` with torchrun and c10d rendezvous; run it once on every node.
#
#   # one node, 8 processes:
#   NPROC_PER_NODE=8 launch/torchrun.sh recipes/real_scale.yaml
#   # two nodes x 8 processes; node 0 is 10.0.0.1 (run the same line on each node, only NODE_RANK differs):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 launch/torchrun.sh recipes/real_scale.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 launch/torchrun.sh recipes/real_scale.yaml
#   # survive a dying rank: restart the whole job up to twice, each time from the latest valid checkpoint
#   MAX_RESTARTS=2 NPROC_PER_NODE=2 launch/torchrun.sh recipes/tiny_omni.yaml
#
# Environment (default in brackets):
#   NNODES          number of nodes taking part [1]
#   NODE_RANK       this node's index, 0..NNODES-1 [0]; node 0 hosts the rendezvous store
#   MASTER_ADDR     address of node 0, reachable from every node [127.0.0.1]
#   MASTER_PORT     free TCP port on node 0 for the c10d rendezvous [29500]
#   NPROC_PER_NODE  processes (ranks) on this node, e.g. its GPU count [1]; world size = NNODES x NPROC_PER_NODE
#   MAX_RESTARTS    how often torchrun restarts every rank after one dies [0]
#   RDZV_ID         job id shared by all nodes of one job [omni-$MASTER_PORT]
#   PYTHON          interpreter with omni-moe installed [python]
# All arguments go to `omni train` (recipe, then key=value overrides). Every node must see the same
# run.output_dir (a shared filesystem): checkpoints, stage markers and exported models live there.
# MASTER_ADDR:MASTER_PORT is the rendezvous endpoint only; torchrun gives the ranks their own MASTER_ADDR/MASTER_PORT.
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
RDZV_ID="${RDZV_ID:-omni-${MASTER_PORT}}"
PYTHON="${PYTHON:-python}"

if [ "$#" -lt 1 ]; then
    sed -n '2,23p' "$0" >&2
    exit 2
fi
for name in NNODES NODE_RANK MASTER_PORT NPROC_PER_NODE MAX_RESTARTS; do
    case "${!name}" in
        '' | *[!0-9]*) echo "launch/torchrun.sh: $name must be a non-negative integer, got '${!name}'" >&2; exit 2 ;;
    esac
done
if [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "launch/torchrun.sh: NODE_RANK=$NODE_RANK must be below NNODES=$NNODES" >&2
    exit 2
fi

# CPU ranks sharing a node's cores: one thread each unless the caller chose otherwise (2 ranks on 2 cores: ~10x faster with one thread each)
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
# A restart needs a fresh store. By default torchrun's agent lends the ranks its own TCPStore, which outlives the
# ranks: restarted ranks then read the dead ranks' gloo/NCCL addresses under the same keys (process groups get the
# same names in every attempt) and time out in connectFullMesh. With this switch each rendezvous round publishes a
# fresh MASTER_PORT and rank 0 hosts a new store (see docs/launch.md).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# node 0 hosts the rendezvous store; on one machine (tests) every node would otherwise claim it
IS_HOST=$([ "$NODE_RANK" -eq 0 ] && echo 1 || echo 0)

exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES}" --node-rank="${NODE_RANK}" --nproc-per-node="${NPROC_PER_NODE}" \
    --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id="${RDZV_ID}" \
    --rdzv-conf="is_host=${IS_HOST}" --max-restarts="${MAX_RESTARTS}" \
    -m omni.cli train "$@"
