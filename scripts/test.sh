#!/usr/bin/env bash
# The test suite: CPU tests, Triton-interpreter tests and the nvcc compile check (all inside pytest).
# Fails on any failure, and on "no tests ran".
set -uo pipefail
cd "$(dirname "$0")/.."
# the C++ extension is part of what is tested: a missing build fails instead of skipping
export RUBRIC_FAST_REQUIRE_NATIVE="${RUBRIC_FAST_REQUIRE_NATIVE:-1}"
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
exit "$rc"
