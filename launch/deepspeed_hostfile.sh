#!/usr/bin/env bash
# Launch `omni train` with the DeepSpeed launcher: run once, on the first host; it starts every host's ranks (over
# pdsh/ssh when the hostfile names more than one host).
#
#   # two GPU nodes with 8 ranks each (hostfile lines: `host slots=N`):
#   printf 'node1 slots=8\nnode2 slots=8\n' > hostfile
#   HOSTFILE=hostfile MASTER_PORT=29500 launch/deepspeed_hostfile.sh recipes/real_scale.yaml
#   # one CPU machine, 2 ranks (on CPU the launcher needs --num_gpus, set from the slots or NPROC_PER_NODE):
#   printf 'localhost slots=2\n' > hostfile && HOSTFILE=hostfile launch/deepspeed_hostfile.sh recipes/tiny_omni.yaml
#   # no hostfile: this machine only, NPROC_PER_NODE ranks
#   NPROC_PER_NODE=2 launch/deepspeed_hostfile.sh recipes/tiny_omni.yaml
#
# Environment (default in brackets):
#   HOSTFILE        file of `host slots=N` lines (blank lines and # comments allowed) [none: this machine only]
#   MASTER_ADDR     address of the first host, reachable from every host [the hostfile's first host; 127.0.0.1]
#   MASTER_PORT     free TCP port on that host [29500]
#   NPROC_PER_NODE  ranks per host on a CPU-only machine (passed as --num_gpus) [the first host's slots; 1]
#   PYTHON          interpreter with omni-moe and deepspeed installed [python]
# All arguments go to `omni train` (recipe, then key=value overrides). Remote hosts need the same repository path,
# environment and run.output_dir (shared filesystem); DeepSpeed forwards the variables listed in ./.deepspeed_env.
set -euo pipefail

MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON="${PYTHON:-python}"
HOSTFILE="${HOSTFILE:-}"

if [ "$#" -lt 1 ]; then
    sed -n '2,20p' "$0" >&2
    exit 2
fi

launcher_args=()
hosts=()
slots=()
if [ -n "$HOSTFILE" ]; then
    if [ ! -f "$HOSTFILE" ]; then
        echo "launch/deepspeed_hostfile.sh: HOSTFILE=$HOSTFILE does not exist" >&2
        exit 2
    fi
    line_number=0
    while IFS= read -r line || [ -n "$line" ]; do
        line_number=$((line_number + 1))
        line="${line%%#*}"
        [ -z "${line// /}" ] && continue
        if [[ ! "$line" =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([0-9]+)[[:space:]]*$ ]]; then
            echo "launch/deepspeed_hostfile.sh: $HOSTFILE line $line_number: expected 'host slots=N', got '$line'" >&2
            exit 2
        fi
        hosts+=("${BASH_REMATCH[1]}")
        slots+=("${BASH_REMATCH[2]}")
    done < "$HOSTFILE"
    if [ "${#hosts[@]}" -eq 0 ]; then
        echo "launch/deepspeed_hostfile.sh: $HOSTFILE lists no host" >&2
        exit 2
    fi
    launcher_args+=("--hostfile=$HOSTFILE")
    if [ "${#hosts[@]}" -eq 1 ]; then
        # one host runs locally (no pdsh); skip the launcher's ssh reachability probe, which needs an ssh server
        launcher_args+=("--no_ssh_check")
    fi
    first_host="${hosts[0]}"
    [ "$first_host" = "localhost" ] && first_host=127.0.0.1
    MASTER_ADDR="${MASTER_ADDR:-$first_host}"
    NPROC_PER_NODE="${NPROC_PER_NODE:-${slots[0]}}"
else
    MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
    NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
fi

if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    # DeepSpeed's CPU accelerator counts NUMA nodes as devices: without --num_gpus a CPU host starts one rank
    launcher_args+=("--num_gpus=$NPROC_PER_NODE")
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
elif [ -z "$HOSTFILE" ]; then
    launcher_args+=("--num_gpus=$NPROC_PER_NODE")
fi

# --module: omni.cli is a module, not a script; --no_local_rank: `omni train` reads LOCAL_RANK from the environment
exec "$PYTHON" -m deepspeed.launcher.runner "${launcher_args[@]}" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --module --no_local_rank \
    omni.cli train "$@"
