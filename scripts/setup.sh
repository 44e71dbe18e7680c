#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of PyTorch and this package.
# A looser torch requirement would pull several GB of CUDA packages on a CPU machine, so torch is
# installed first, pinned, and only when the venv has none (set ACCEL_TORCH to choose another).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "${ACCEL_TORCH:-torch==2.13.0}"
fi
stamp=.venv/.accel-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q -e ".[${ACCEL_EXTRAS:-dev,video,app}]"
  touch "$stamp"
fi
