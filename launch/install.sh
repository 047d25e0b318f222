#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install omni-moe into it.
#
#   bash launch/install.sh            # runtime only, into ./.venv
#   bash launch/install.sh test       # plus the test extra (and transformers' generic model tests, see below)
#   VENV=/path/to/venv bash launch/install.sh
#   LATEST=1 bash launch/install.sh test   # the newest versions pyproject.toml allows, not the tested set
#
# By default every package comes at the version in launch/requirements.lock (the tested set, transitive dependencies
# included; a pip constraints file), and the script checks the venv against it afterwards: the same environment on
# every fresh machine until the lock is refreshed on purpose (bash launch/lock.sh). pyproject.toml keeps the ranges
# that an install into your own environment may take. LATEST=1 ignores the lock (and upgrades a reused venv), then
# lists how the result differs from it: that is how .ci/run finds the next upstream break on purpose.
#
# torch is installed FIRST and pinned (TORCH_SPEC, default torch==2.13.0 — the CPU wheel on this kind of machine),
# so that nothing later pulls a multi-GB CUDA build; the script checks that pip did not replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${1:-}
LOCK=${LOCK:-launch/requirements.lock}
if [ "${LATEST:-0}" = 1 ]; then
  PINS=(--upgrade --upgrade-strategy eager)
else
  PINS=(-c "$LOCK")
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null
"$PY" -m pip install -q "${PINS[@]}" "$TORCH_SPEC"
before=$("$PY" -c 'import torch; print(torch.__version__)')
if [ -n "$EXTRAS" ]; then
  "$PY" -m pip install -q "${PINS[@]}" -e ".[$EXTRAS]" "$TORCH_SPEC"
else
  "$PY" -m pip install -q "${PINS[@]}" -e . "$TORCH_SPEC"
fi
after=$("$PY" -c 'import torch; print(torch.__version__)')
if [ "$before" != "$after" ]; then
  echo "install.sh: pip replaced torch $before with $after; pin the offending package" >&2
  exit 1
fi
if [ "${LATEST:-0}" = 1 ]; then
  if [ -f "$LOCK" ]; then "$PY" launch/lockfile.py diff "$LOCK"; fi
else
  "$PY" launch/lockfile.py check "$LOCK"
fi
# DeepSpeed JIT-compiles its CPU communication op at the first distributed init (30-45 s, cached per machine under
# ~/.cache/torch_extensions). Build it now, once, so the first training run or test does not stall on a compiler.
"$PY" - <<'PYEOF'
import torch
if not torch.cuda.is_available():
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)
PYEOF
# The test extra also fetches transformers' own generic model tests (tests/test_modeling_common.py of the source
# distribution of the installed transformers version; its wheel does not carry them), which tests/unit/
# test_hf_contract*.py run against our model. They are fetched, not copied into the repo: a gitignored cache folder
# per version, downloaded once.
if [[ ",$EXTRAS," == *",test,"* ]]; then
  TF_VERSION=$("$PY" -c 'import transformers; print(transformers.__version__)')
  TF_TESTS=.cache/transformers-tests/$TF_VERSION
  if [ ! -f "$TF_TESTS/tests/test_modeling_common.py" ]; then
    rm -rf "$TF_TESTS.partial" && mkdir -p "$TF_TESTS.partial"
    "$PY" -m pip download -q --no-deps --no-binary :all: "transformers==$TF_VERSION" -d "$TF_TESTS.partial"
    tar -xzf "$TF_TESTS.partial/transformers-$TF_VERSION.tar.gz" -C "$TF_TESTS.partial" --strip-components=1 \
      "transformers-$TF_VERSION/tests/test_modeling_common.py"
    rm -f "$TF_TESTS.partial/transformers-$TF_VERSION.tar.gz"
    rm -rf "$TF_TESTS" && mv "$TF_TESTS.partial" "$TF_TESTS"
  fi
fi
echo "install.sh: omni-moe installed in $VENV (torch $after)"
