#!/usr/bin/env bash
# The GPU check in one call, on a machine with this checkout and whatever Python packages it
# already has (no network, no install): lmforge is imported from src/. See gpu_check.py.
#   bash bench/gpu_check.sh            # ~6 min on one H100/H200; bench/results/gpu_check.json
#   bash bench/gpu_check.sh --quick    # the CPU-runnable parts, tiny models
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" bench/gpu_check.py "$@"
