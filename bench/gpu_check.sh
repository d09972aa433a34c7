#!/usr/bin/env bash
# One-shot GPU check (no internet needed): install the anchor wheels from .whl/, build the extension,
# run the GPU tests of the Triton kernels in bf16, then the kernel benchmark; prints the table.
# Budget: about 6 minutes in all (each stage has its own timeout). Outputs go to $OUT (default bench/out).
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

stamp "anchor wheels (.whl/, --no-deps --no-index)"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -3 || true
else
  echo "no .whl/ directory: Liger-Kernel / Cut Cross-Entropy rows will read n/a"
fi

stamp "build (RUBRIC_FAST_BUILD_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
if ! RUBRIC_FAST_BUILD_CUDA=1 timeout 150 "$PY" -m pip install -q -e . --no-build-isolation --no-deps \
      > "$OUT/build.log" 2>&1; then
  echo "CUDA build failed or timed out (see $OUT/build.log; tail below); installing without it"
  tail -20 "$OUT/build.log"
  RUBRIC_FAST_BUILD_CUDA=0 timeout 60 "$PY" -m pip install -q -e . --no-build-isolation --no-deps \
      >> "$OUT/build.log" 2>&1 || echo "plain install failed too"
fi

stamp "GPU tests (bf16, error-ratio rule)"
timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_triton.py tests/test_gpu_native.py --junitxml="$OUT/gpu_tests.xml" \
    2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
TEST_RC=${PIPESTATUS[0]}

stamp "selfcheck: every backend (torch, cuda C++, triton) against the float64 reference, fp32 and bf16"
timeout 60 "$PY" -m rubric_fast.selfcheck --dtype float32 --dtype bfloat16 2>&1 | tee "$OUT/selfcheck.txt"
SELF_RC=${PIPESTATUS[0]}

stamp "benchmark"
BENCH_LIGER_COMPILED="${BENCH_LIGER_COMPILED:-0}" timeout 170 "$PY" -m rubric_fast.cli bench --reps 3 \
    --json "$OUT/bench.json" --markdown "$OUT/bench.md" 2>&1 | tee "$OUT/bench.txt"
BENCH_RC=${PIPESTATUS[0]}
if [ "$BENCH_RC" != 0 ] && [ -f "$OUT/bench.md" ]; then
  echo "benchmark stopped early (rc=$BENCH_RC); cases finished so far:"
  cat "$OUT/bench.md"
fi

stamp "train-step benchmark: Qwen2-0.5B shape from its config (no weights), fused vs materialized logits"
timeout 90 "$PY" bench/bench_train.py --device cuda --dtype bfloat16 --model qwen2-0.5b --n-seqs 64 \
    --prompt-len 256 --completion-len 768 --token-budget 16384 --iters 3 2>&1 | tee "$OUT/bench_train.txt" \
    || echo "train-step benchmark did not finish"

stamp "done: gpu tests rc=$TEST_RC, selfcheck rc=$SELF_RC, bench rc=$BENCH_RC; outputs in $OUT"
[ "$TEST_RC" = 0 ] && [ "$SELF_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
