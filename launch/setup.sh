#!/usr/bin/env bash
# One-time set-up (idempotent): a virtual environment in .venv with lmforge installed.
#   bash launch/setup.sh        runtime only
#   bash launch/setup.sh dev    plus the test dependencies (pytest, transformers, setuptools)
# Torch: an already-installed torch in .venv is kept (bring your own CUDA build); otherwise
# $LMFORGE_TORCH is installed, by default the pinned CPU-compatible release torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install ${LMFORGE_TORCH:-torch==2.13.0}
fi
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
pip install -e ".${extra}"
.venv/bin/python -c "import torch, deepspeed, lmforge; print(f'lmforge ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 | tail -1
