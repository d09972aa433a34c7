#!/usr/bin/env bash
# One-shot GPU check for an H100 / H200 without internet, within 5 minutes from start to finish:
#   device info -> anchor wheels (.whl/) -> install -> compile-check (this device's arch) ->
#   GPU tests of the Triton kernels, bf16 + fp32 (while the CUDA extension builds in the background) ->
#   GPU tests of the CUDA C++ ops -> kernel benchmark (10 timed reps per row, most important rows first) ->
#   train-step benchmark (only with the time that is left) -> dated section in bench/RESULTS.md.
#
#   bash bench/gpu_check.sh             # on the GPU machine; outputs in $OUT (default bench/out)
#   bash bench/gpu_check.sh --dry-run   # CPU plumbing check: tiny shapes, 2 reps, nothing installed or built,
#                                       # RESULTS.md written to $OUT (default: a temp dir), not bench/RESULTS.md
# Environment: OUT (output folder), PYTHON (default python3), GPU_CHECK_DRY_RUN=1 (same as --dry-run),
# GPU_CHECK_SKIP="compile-check train" (stages to skip), GPU_CHECK_COMMIT (recorded in RESULTS.md),
# BENCH_LIGER_COMPILED=1 (Liger with torch.compile; off by default to stay in budget), MAX_JOBS (16).
#
# Every stage has a budget below (the train-step stage takes what is left, less the write-up's budget); the
# budgets add up to at most TOTAL_BUDGET = 300 s (tests/test_bench_command.py checks it), and no stage runs
# past the script's deadline. Files under $OUT (at most 8): gpu_check.log, build.log, compile_check.txt,
# gpu_tests.txt, bench.json, bench_train.txt, RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

# stage budgets, seconds
TOTAL_BUDGET=300
B_DEVICE=10
B_WHEELS=10
B_INSTALL=20
B_COMPILE_CHECK=30
B_TRITON_TESTS=70
B_BUILD_WAIT=30
B_NATIVE_TESTS=20
B_BENCH=85
B_WRITEUP=10
# the CUDA build runs in the background during compile-check and the Triton tests, and is waited for after
B_BUILD_BACKGROUND=$((B_COMPILE_CHECK + B_TRITON_TESTS + B_BUILD_WAIT))

DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (accepted: --dry-run, --help)"; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
SKIP=" ${GPU_CHECK_SKIP:-} "
T0=$(date +%s)
DEADLINE=$((T0 + TOTAL_BUDGET))
RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)"
if [ "$DRY_RUN" = 1 ]; then
  OUT="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
  RESULTS="$OUT/RESULTS.md"
else
  OUT="${OUT:-bench/out}"
  RESULTS="bench/RESULTS.md"
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"

now() { date +%s; }
# budget_for NAME SECONDS|rest: prints the stage header and sets T, the stage's timeout: its budget, cut to
# what is left before the deadline ('rest': all of that, less the write-up's budget); at least 1 s
# (`timeout 0` would mean no limit at all)
budget_for() {
  local name=$1 budget=$2 left
  left=$((DEADLINE - $(now)))
  if [ "$budget" = rest ]; then T=$((left - B_WRITEUP)); else T=$budget; fi
  if [ "$T" -gt "$left" ]; then T=$left; fi
  if [ "$T" -lt 1 ]; then T=1; fi
  echo "== [$(( $(now) - T0 ))s] $name (budget ${T}s)"
}
skipped() { case "$SKIP" in *" $1 "*) echo "   skipped (GPU_CHECK_SKIP)"; return 0 ;; esac; return 1; }
# exit status -> words for the checks line of RESULTS.md
verdict() {
  case "$1" in
    0) echo "passed" ;;
    124|137|143) echo "TIMED OUT" ;;
    skipped|n/a) echo "$1" ;;
    *) echo "FAILED (rc=$1)" ;;
  esac
}
# the counts of pytest's final summary line ("12 passed, 3 skipped in 4.5s" -> "12 passed, 3 skipped")
pytest_counts() {
  local line
  line=$(grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed).* in [0-9.]+s' "$1" 2>/dev/null \
         | tail -n 1)
  if [ -z "$line" ]; then echo "no pytest summary"; return; fi
  echo "$line" | grep -Eo '[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)' | paste -sd, - \
    | sed 's/,/, /g'
}

main() {
  echo "gpu_check.sh: run $RUN_ID, dry run: $DRY_RUN, outputs in $OUT, total budget ${TOTAL_BUDGET}s"

  # ---------------------------------------------------------------------------------------------
  budget_for "device" "$B_DEVICE"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    | sed 's/^/   /' || echo "   no nvidia-smi"
  local info
  info=$(timeout "$T" "$PY" -c "
import torch, triton
cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__, 'device',
      torch.cuda.get_device_name() if cap else 'cpu')
print(cap[0] * 10 + cap[1] if cap else 90)" 2>&1)
  echo "$info" | head -n -1 | tail -n 3 | sed 's/^/   /'
  ARCH=$(echo "$info" | tail -n 1)
  [[ "$ARCH" =~ ^[0-9]+$ ]] || ARCH=90
  ARCH_LIST="${ARCH:0:${#ARCH}-1}.${ARCH: -1}"
  echo "   sm_$ARCH, TORCH_CUDA_ARCH_LIST=$ARCH_LIST"

  # ---------------------------------------------------------------------------------------------
  budget_for "anchor wheels (.whl/, --no-deps --no-index)" "$B_WHEELS"
  if [ "$DRY_RUN" = 1 ]; then
    echo "   dry run: nothing installed"
  elif compgen -G ".whl/*.whl" > /dev/null; then
    local site=/tmp/gpu_check_site
    timeout "$T" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" .whl/*.whl 2>&1 | tail -n 3
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "   no .whl/ folder: the liger and cce rows will read n/a"
  fi

  # ---------------------------------------------------------------------------------------------
  budget_for "install rubric_fast (editable, Python only; the extension builds next)" "$B_INSTALL"
  if [ "$DRY_RUN" = 1 ]; then
    echo "   dry run: the current environment as it is"
  elif ! RUBRIC_FAST_BUILD_EXT=0 timeout "$T" "$PY" -m pip install -q -e . --no-build-isolation --no-deps \
         > "$OUT/build.log" 2>&1; then
    echo "   install failed:"; tail -n 8 "$OUT/build.log"
  fi

  # The CUDA extension builds in the background while compile-check and the Triton tests run (they do not
  # need it), within their budgets and the build-wait stage's; the library is moved into place in one
  # rename, so that no process loads a half-written file.
  if [ "$DRY_RUN" = 1 ]; then
    timeout "$B_BUILD_BACKGROUND" "$PY" -c "import torch, rubric_fast._C; print('dry run: extension not rebuilt')" \
      >> "$OUT/build.log" 2>&1 &
  else
    mkdir -p build
    # shellcheck disable=SC2016  # $0 expands in the inner shell: it is $PY
    timeout -k 3 "$B_BUILD_BACKGROUND" env RUBRIC_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH_LIST" \
      MAX_JOBS="${MAX_JOBS:-16}" bash -c '"$0" setup.py -q build_ext --build-lib build/gpu_check_lib \
        --build-temp build/gpu_check_tmp && mv -f build/gpu_check_lib/rubric_fast/_C*.so rubric_fast/' "$PY" \
      >> "$OUT/build.log" 2>&1 &
  fi
  local build_pid=$!

  # ---------------------------------------------------------------------------------------------
  budget_for "compile-check --arch $ARCH (every Triton variant, ahead of time)" "$B_COMPILE_CHECK"
  CC_RC=n/a
  if skipped compile-check; then
    CC_RC=skipped
  elif "$PY" -c "import sys, rubric_fast.cli as c; sys.exit(0 if 'compile-check' in c.COMMANDS else 1)" 2>/dev/null
  then
    # the dtypes the tests and the benchmark run; -v: every row as it compiles, so a timeout still shows some
    timeout -k 3 "$T" "$PY" -m rubric_fast.cli compile-check --arch "$ARCH" --dtype bfloat16 --dtype float32 -v \
      > "$OUT/compile_check.txt" 2>&1
    CC_RC=$?
    tail -n 6 "$OUT/compile_check.txt" | cut -c1-160
    echo "   compile-check: $(verdict "$CC_RC")"
  else
    echo "   rubric-fast compile-check does not exist in this tree: skipped" | tee "$OUT/compile_check.txt"
  fi

  # ---------------------------------------------------------------------------------------------
  budget_for "GPU tests: Triton kernels, bf16 error-ratio rule + fp32 at 1e-4 (poisoned outputs)" \
    "$B_TRITON_TESTS"
  local tests=() f
  for f in tests/test_gpu_*.py; do [ "$f" = tests/test_gpu_native.py ] || tests+=("$f"); done
  local xdist=()
  if [ "$DRY_RUN" != 1 ] && "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n 3 --dist loadfile); fi
  timeout -k 3 "$T" "$PY" -m pytest -q -p no:cacheprovider -rfE "${xdist[@]}" "${tests[@]}" \
    > "$OUT/gpu_tests.txt" 2>&1
  TRITON_RC=$?
  TRITON_COUNTS=$(pytest_counts "$OUT/gpu_tests.txt")
  grep -E '^(FAILED|ERROR)' "$OUT/gpu_tests.txt" | cut -c1-200 | head -n 12
  echo "   ${tests[*]}: $(verdict "$TRITON_RC"): $TRITON_COUNTS"

  # ---------------------------------------------------------------------------------------------
  budget_for "build: CUDA extension (sm_$ARCH), waiting for the background build" "$B_BUILD_WAIT"
  local waited=0
  while kill -0 "$build_pid" 2>/dev/null && [ "$waited" -lt "$T" ]; do sleep 1; waited=$((waited + 1)); done
  kill -TERM "$build_pid" 2>/dev/null
  wait "$build_pid"
  BUILD_RC=$?
  echo "   build: $(verdict "$BUILD_RC") (build.log)"
  if [ "$BUILD_RC" != 0 ]; then
    grep -iE 'error|failed' "$OUT/build.log" | head -n 6 | cut -c1-200
  fi

  # ---------------------------------------------------------------------------------------------
  budget_for "GPU tests: CUDA C++ ops" "$B_NATIVE_TESTS"
  timeout -k 3 "$T" "$PY" -m pytest -q -p no:cacheprovider -rfEs tests/test_gpu_native.py \
    > "$OUT/gpu_tests_native.tmp" 2>&1
  NATIVE_RC=$?
  NATIVE_COUNTS=$(pytest_counts "$OUT/gpu_tests_native.tmp")
  { echo; echo "== tests/test_gpu_native.py"; cat "$OUT/gpu_tests_native.tmp"; } >> "$OUT/gpu_tests.txt"
  grep -E '^(FAILED|ERROR)' "$OUT/gpu_tests_native.tmp" | cut -c1-200 | head -n 8
  echo "   tests/test_gpu_native.py: $(verdict "$NATIVE_RC"): $NATIVE_COUNTS"
  rm -f "$OUT/gpu_tests_native.tmp"

  local status=(--status "compile-check sm_$ARCH=$(verdict "$CC_RC")"
                --status "CUDA build=$(verdict "$BUILD_RC")"
                --status "GPU tests, Triton bf16 + fp32=$(verdict "$TRITON_RC") ($TRITON_COUNTS)"
                --status "GPU tests, CUDA C++=$(verdict "$NATIVE_RC") ($NATIVE_COUNTS)")

  # ---------------------------------------------------------------------------------------------
  budget_for "kernel benchmark (ours and the floor first, then schedules, op layer, anchors)" "$B_BENCH"
  local bench_args=(--reps 10 --warmup 2)
  [ "$DRY_RUN" = 1 ] && bench_args=(--device cpu --reps 2 --warmup 1)
  [ -f "$RESULTS" ] || cp bench/RESULTS.md "$RESULTS"
  # the suite itself stops starting rows a little before the stage's limit, so that it ends cleanly
  RUBRIC_FAST_AUTOTUNE="${RUBRIC_FAST_AUTOTUNE:-1}" BENCH_LIGER_COMPILED="${BENCH_LIGER_COMPILED:-0}" timeout -k 3 "$T" "$PY" -m rubric_fast.bench_command \
    "${bench_args[@]}" --time-budget $((T > 24 ? T - 12 : T / 2)) --run-id "$RUN_ID" \
    --json "$OUT/bench.json" --results "$RESULTS" "${status[@]}" 2>&1 | cut -c1-170
  BENCH_RC=${PIPESTATUS[0]}
  [ "$DRY_RUN" = 1 ] || cp -f "$RESULTS" "$OUT/RESULTS.md"

  # ---------------------------------------------------------------------------------------------
  budget_for "train-step benchmark (Qwen2-0.5B shape, fused vs materialized logits; only if time is left)" rest
  local train="not run"
  if skipped train; then
    train=skipped
  elif [ "$T" -lt 45 ] && [ "$DRY_RUN" != 1 ]; then
    echo "   skipped: ${T}s left, it needs about 45s"
    train="skipped (${T}s left)"
  else
    local train_args=(--device cuda --dtype bfloat16 --model qwen2-0.5b --n-seqs 32 --prompt-len 256
                      --completion-len 768 --token-budget 16384 --iters 2)
    [ "$DRY_RUN" = 1 ] && train_args=(--device cpu --model tiny --n-seqs 8 --prompt-len 8 --completion-len 16
                                      --iters 1)
    timeout -k 3 "$T" "$PY" bench/bench_train.py "${train_args[@]}" > "$OUT/bench_train.txt" 2>&1
    local train_rc=$?
    grep -v '^SUMMARY' "$OUT/bench_train.txt" | tail -n 4 | cut -c1-160
    train=$(sed -n 's/^SUMMARY //p' "$OUT/bench_train.txt" | tail -n 1)
    [ -n "$train" ] || train="$(verdict "$train_rc") (bench_train.txt)"
  fi

  # ---------------------------------------------------------------------------------------------
  budget_for "write-up: $RESULTS" "$B_WRITEUP"
  if [ -f "$OUT/bench.json" ]; then
    timeout "$T" "$PY" -m rubric_fast.bench_command --from-json "$OUT/bench.json" --results "$RESULTS" \
      "${status[@]}" --status "benchmark=$(verdict "$BENCH_RC")" --status "train step=$train" | cut -c1-170
  else
    echo "   no bench.json: the benchmark wrote nothing"
  fi
  [ "$DRY_RUN" = 1 ] || cp -f "$RESULTS" "$OUT/RESULTS.md"

  echo "== [$(( $(now) - T0 ))s] done: compile-check $(verdict "$CC_RC"), CUDA build $(verdict "$BUILD_RC")," \
       "Triton tests $(verdict "$TRITON_RC"), CUDA C++ tests $(verdict "$NATIVE_RC")," \
       "benchmark $(verdict "$BENCH_RC"); outputs in $OUT"
  # passes when the extension built, the kernels are correct and the benchmark ran; a compile-check that is
  # missing or ran out of time is reported above, not a failure
  case "$CC_RC" in 0|n/a|skipped|124|137|143) ;; *) return 1 ;; esac
  [ "$BUILD_RC" = 0 ] && [ "$TRITON_RC" = 0 ] && [ "$NATIVE_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
