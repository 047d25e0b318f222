#!/usr/bin/env bash
# Wheels a GPU machine's image lacks (or holds too old), at the versions of launch/requirements.lock, for CPython 3.12
# on x86-64 Linux: what launch/gpu_check.sh needs beside the image's own torch, numpy, pillow, pyyaml, tqdm, ...
#
#   bash launch/gpu_wheels.sh .whl      # then carry .whl to the GPU machine (see launch/gpu_check.sh)
#
# DeepSpeed publishes no wheel: it is built here, pure Python, with this venv's torch (DS_BUILD_OPS=0: its ops are
# JIT-compiled on the machine that uses them). av (video decoding, ~35 MB) is left out: tests that need it skip there.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:?usage: bash launch/gpu_wheels.sh DEST}
PY=${PYTHON:-.venv/bin/python}
LOCK=launch/requirements.lock
PACKAGES=(transformers huggingface-hub tokenizers safetensors peft accelerate webdataset braceexpand soundfile cffi
          pycparser hjson pydantic pydantic-core annotated-types typing-inspection httpx2 httpcore2 truststore kernels
          tomlkit)
pinned() { grep -i "^$1==" "$LOCK" || { echo "gpu_wheels.sh: $1 is not in $LOCK" >&2; exit 1; }; }
mkdir -p "$DEST"
specs=()
for name in "${PACKAGES[@]}"; do specs+=("$(pinned "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" "${specs[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$(pinned deepspeed)"
# this project's own wheel: omni_moe.{data,training,modeling} import only from an installed copy (pyproject.toml's
# package-dir); the GPU machine runs `omni` from the repository, these three from /tmp/site
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" .
du -sh "$DEST"
