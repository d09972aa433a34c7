#!/usr/bin/env bash
# Set up a virtual environment for a CPU-only machine: torch pinned to the CPU build (an unpinned torch
# pulls a multi-GB CUDA build), then rubric_fast in editable mode with its test and judge extras.
# Usage: bash scripts/setup_cpu.sh   (idempotent; PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${RUBRIC_FAST_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
echo "$TORCH_PIN" > .venv/constraints.txt
export PIP_CONSTRAINT="$PWD/.venv/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip setuptools wheel
python -m pip install -q "$TORCH_PIN"
# --no-build-isolation: the extension builds against the torch installed above, not a fresh unpinned one
python -m pip install -q --no-build-isolation -e ".[dev,judges]"
python -c "import rubric_fast.ops as o; print('rubric_fast ready; backends:', ', '.join(o.available_backends()))"
