#!/usr/bin/env bash
# Set-up for a fresh machine: a virtual environment in .venv with torch and crb (+ test tools).
# torch goes in first, pinned, so no later step pulls a multi-GB CUDA build in its place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${CRB_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[test]"
touch .venv/.crb-installed
