#!/usr/bin/env bash
# The GPU check: everything this project can only verify on a CUDA machine, in one run, with a JSON + markdown report.
#
#   bash launch/gpu_check.sh OUT            # on a GPU machine: (a) tests/gpu, (b) tiny-omni on 1 GPU in bf16 to its
#                                           # eval table, (c) MoE layer vs transformers' grouped_mm experts, bf16,
#                                           # (d) a ~1 B-active training step: tokens/s, TFLOPS, MFU, peak memory
#   bash launch/gpu_check.sh --cpu OUT      # the CPU-safe parts (CI): (a) with its CUDA tests skipped and counted,
#                                           # (c) + (d) at the tiny preset on the CPU in fp32; (b) not run
#
# PYTHON (default .venv/bin/python, else python3) must hold the project's dependencies and the project's own
# omni_moe.{data,training,modeling} (installed: they do not import from the tree); on a bare GPU image carry both as
# wheels: `bash launch/gpu_wheels.sh .whl` here, then on the GPU machine
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site \
#     PYTHON=python3 bash launch/gpu_check.sh OUT Each part runs under its own time limit (PART_TIMEOUT_S,
# default 540 s; the tiny-omni run TINY_TIMEOUT_S, default 900 s) and the script goes on after a failure: OUT/summary.md
# lists each part's exit code, and the script exits non-zero if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; shift; fi
OUT=${1:?usage: bash launch/gpu_check.sh [--cpu] OUT}
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PART_TIMEOUT_S=${PART_TIMEOUT_S:-540}
TINY_TIMEOUT_S=${TINY_TIMEOUT_S:-900}
RUNS=${RUNS:-/tmp/omni_gpu_check}  # the tiny-omni run folder: many files, kept out of OUT (which holds the report)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
declare -a SUMMARY=()
failed=0

part() {  # part NAME TIMEOUT COMMAND...: run one part, log to OUT/NAME.log, record its exit code
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local code=$?
  SUMMARY+=("| $name | $code | $((SECONDS - start)) s | $(grep -v "^[[:space:]]*$" "$OUT/$name.log" | tail -n 1 | tr '|' '/' | cut -c1-120) |")
  [ "$code" -eq 0 ] || failed=1
  echo "gpu_check: $name exited $code after $((SECONDS - start)) s (log: $OUT/$name.log)"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; } \
  >"$OUT/device.txt"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' >>"$OUT/device.txt" 2>&1

part gpu_tests "$PART_TIMEOUT_S" "$PYTHON" -m pytest -q -rs tests/gpu
if [ "$MODE" = gpu ]; then
  part tiny_omni "$TINY_TIMEOUT_S" "$PYTHON" -m omni.cli train recipes/tiny_omni.yaml "run.output_dir=$RUNS/tiny_omni" \
    run.nproc_per_node=1 parallel.ep_size=1 parallel.precision=bf16
  part benchmarks "$PART_TIMEOUT_S" "$PYTHON" -m omni.benchmarks.gpu --out "$OUT" --preset 1b --device cuda --dtype bf16
else
  part benchmarks "$PART_TIMEOUT_S" "$PYTHON" -m omni.benchmarks.gpu --out "$OUT" --preset tiny --device cpu \
    --dtype fp32 --repeats 2
fi

{
  echo "# GPU check ($MODE mode), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  sed 's/^/    /' "$OUT/device.txt"
  echo
  echo "| part | exit | time | last line |"
  echo "|---|---:|---:|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  [ -f "$OUT/report.md" ] && cat "$OUT/report.md"
} >"$OUT/summary.md"
cat "$OUT/summary.md"
exit "$failed"
