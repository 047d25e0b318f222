#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install omni-moe into it.
#
#   bash launch/install.sh            # runtime only, into ./.venv
#   bash launch/install.sh test       # plus the test extra
#   VENV=/path/to/venv bash launch/install.sh
#
# torch is installed FIRST and pinned (TORCH_SPEC, default torch==2.13.0 — the CPU wheel on this kind of machine),
# so that nothing later pulls a multi-GB CUDA build; the script checks that pip did not replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${1:-}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null
"$PY" -m pip install -q "$TORCH_SPEC"
before=$("$PY" -c 'import torch; print(torch.__version__)')
if [ -n "$EXTRAS" ]; then
  "$PY" -m pip install -q -e ".[$EXTRAS]"
else
  "$PY" -m pip install -q -e .
fi
after=$("$PY" -c 'import torch; print(torch.__version__)')
if [ "$before" != "$after" ]; then
  echo "install.sh: pip replaced torch $before with $after; pin the offending package" >&2
  exit 1
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
echo "install.sh: omni-moe installed in $VENV (torch $after)"
