"""Rollout benchmarks: memory of the hf engine's sampler log-probs, and rollout tokens/s hf vs vllm.

    python bench/bench_rollout.py memory     # peak memory: generate(output_scores) vs the step-by-step recorder
    python bench/bench_rollout.py speed      # rollout tokens/s, hf engine vs vllm engine (needs vllm importable)
    .venv-vllm/bin/python bench/bench_rollout.py speed --models tiny,small   # in the CPU vLLM environment

``memory``: one ``generate`` of B completions of T tokens over a V-token vocabulary, two ways:

* ``scores`` (before): ``generate(output_scores=True)`` + ``compute_transition_scores``, which keeps a
  [T, B, V] fp32 tuple of processed scores (B=16, T=128, V=151936: 1.16 GiB);
* ``recorder`` (after): :class:`rubric_fast.trainer.rollout.HFRolloutEngine`, whose last logits processor
  keeps only the drawn token's log-prob per step.

On the CPU each variant runs in a fresh subprocess and the figure is the growth of the peak RSS over the
setup (model built, one warm-up generate of 1 token); on CUDA ``torch.cuda.max_memory_allocated`` over the
call minus what was allocated before it.

``speed``: the trainer's own engines on the same prompts (the embedded task's, G completions each), with
``--new-tokens`` new tokens at most, median of ``--iters`` calls after one warm-up; tokens/s counts generated
tokens (EOS included). Models: the trainer's tiny Llama built from a config (char vocabulary, random weights),
``tiny`` (64 wide, 2 layers) and ``small`` (256 wide, 4 layers), both with head_dim 64. The vllm engine
runs colocated (an in-process ``vllm.LLM``) with the policy's weights pushed, as in training.
Benchmarks measure; they assert nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _StubTokenizer:
    """Enough of a tokenizer for the engine over a vocabulary it does not need to spell (memory mode)."""

    def __init__(self, vocab: int):
        self.pad_token_id, self.eos_token_id = 0, vocab - 1

    def decode(self, ids, skip_special_tokens=True):
        return ""


def _memory_worker(args) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rubric_fast.trainer.rollout import HFRolloutEngine

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                      intermediate_size=128, tie_word_embeddings=True, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg).to(device).eval()
    prompts = torch.randint(1, args.vocab - 1, (args.batch, args.prompt_len)).tolist()
    tok = _StubTokenizer(args.vocab)
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def run(n_new: int) -> int:
        if args.worker == "scores":
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=n_new,
                                     min_new_tokens=n_new, output_scores=True, return_dict_in_generate=True,
                                     pad_token_id=0, eos_token_id=args.vocab - 1, top_k=None)
                lp = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
            return int(lp.shape[1]) * args.batch
        eng = HFRolloutEngine(model, tok, max_new_tokens=n_new, temperature=1.0, batch_size=args.batch)
        return sum(len(c.token_ids) for b in eng.generate(prompts) for c in b)

    run(1)  # warm-up: allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _peak_rss_mib()
    t0 = time.perf_counter()
    n_tok = run(args.new_tokens)
    dt = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _peak_rss_mib() - base
    return {"mode": args.worker, "device": device.type, "vocab": args.vocab, "batch": args.batch,
            "new_tokens": args.new_tokens, "generated": n_tok, "peak_extra_mib": peak,
            "scores_tensor_mib": args.new_tokens * args.batch * args.vocab * 4 / 2**20, "seconds": dt}


def memory(args) -> list[dict]:
    rows = []
    print(f"{'mode':<9} {'device':<6} {'B':>4} {'T':>5} {'V':>7} {'peak extra MiB':>15} {'[T,B,V] MiB':>12} {'s':>7}")
    for mode in ("recorder", "scores"):
        cmd = [sys.executable, __file__, "memory", "--worker", mode, "--device", args.device, "--vocab",
               str(args.vocab), "--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--prompt-len",
               str(args.prompt_len)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # fresh process: clean peak RSS
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{mode}: failed (rc={proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            return rows
        r = json.loads(line[-1][7:])
        rows.append(r)
        print(f"{r['mode']:<9} {r['device']:<6} {r['batch']:>4} {r['new_tokens']:>5} {r['vocab']:>7} "
              f"{r['peak_extra_mib']:>15.1f} {r['scores_tensor_mib']:>12.1f} {r['seconds']:>7.2f}", flush=True)
    return rows


SPEED_MODELS = {  # char vocabulary (the trainer's tiny tokenizer); head_dim 64 (vLLM's CPU kernels need >= 32)
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 1, "intermediate_size": 128},
    "small": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 688},
    # Qwen2-0.5B's decoder shape (no GQA, char vocabulary): for a GPU, e.g. from bench/gpu_check.sh:
    #   python bench/bench_rollout.py speed --models qwen2-0.5b --device cuda --prompts 32 --new-tokens 256
    "qwen2-0.5b": {"arch": "qwen2", "hidden_size": 896, "num_layers": 24, "num_heads": 14, "intermediate_size": 4864,
                   "tie_word_embeddings": True},
}


def _speed_worker(args) -> dict:
    from rubric_fast.rubric import load_rubrics
    from rubric_fast.trainer.config import DEFAULT_DATASET, ModelConfig, RolloutConfig, TinyModelConfig
    from rubric_fast.trainer.rollouts import encode_prompt
    from rubric_fast.trainer.models import build_char_tokenizer, load_policy
    from rubric_fast.trainer.rollout import HFRolloutEngine

    device = torch.device(args.device)
    engine_name, model_name = args.worker.split(":")
    if device.type == "cpu" and engine_name == "hf" and args.threads > 0:
        torch.set_num_threads(args.threads)  # the trainer's cpu_threads (1 in the embedded default)
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    mc = ModelConfig(tiny=TinyModelConfig(**SPEED_MODELS[model_name]))
    policy = load_policy(mc, tok, device).eval()
    rubrics = load_rubrics(DEFAULT_DATASET)
    prompts = [encode_prompt(tok, rubrics[i % len(rubrics)].prompt)
               for i in range(args.prompts) for _ in range(args.generations)]
    if engine_name == "hf":
        eng = HFRolloutEngine(policy, tok, max_new_tokens=args.new_tokens, temperature=1.0, batch_size=len(prompts))
    else:
        import tempfile

        from rubric_fast.trainer.vllm_engine import VLLMColocatedEngine

        rc = RolloutConfig(max_new_tokens=args.new_tokens, temperature=1.0, batch_size=len(prompts))
        rc.vllm.kv_cache_gb = args.kv_cache_gb
        rc.vllm.max_model_len = 512
        eng = VLLMColocatedEngine(policy, tok, rc, mc, work_dir=tempfile.mkdtemp(prefix="bench_vllm_"),
                                  device=device)
    list(eng.generate(prompts))  # warm-up: the same batch shape as the timed calls
    times, n_tok = [], 0
    for _ in range(args.iters):
        t0 = time.perf_counter()
        comps = [c for b in eng.generate(prompts) for c in b]
        times.append(time.perf_counter() - t0)
        n_tok = sum(len(c.token_ids) for c in comps)
    t = sorted(times)[len(times) // 2]
    return {"engine": engine_name, "model": model_name, "device": device.type, "sequences": len(prompts),
            "generated_tokens": n_tok, "seconds": t, "tokens_per_s": n_tok / t}


def speed(args) -> list[dict]:
    """Each (engine, model) in a fresh subprocess: vLLM's CPU worker binds this process's OpenMP threads."""
    rows = []
    print(f"{'engine':<7} {'model':<6} {'device':<6} {'seqs':>5} {'tokens':>7} {'s':>8} {'tokens/s':>10}")
    for model_name in args.models.split(","):
        for engine_name in args.engines.split(","):
            cmd = [sys.executable, __file__, "speed", "--worker", f"{engine_name}:{model_name}", "--device",
                   args.device, "--prompts", str(args.prompts), "--generations", str(args.generations),
                   "--new-tokens", str(args.new_tokens), "--iters", str(args.iters), "--kv-cache-gb",
                   str(args.kv_cache_gb), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                  env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{engine_name} {model_name}: failed (rc={proc.returncode})\n{proc.stderr[-2000:]}",
                      file=sys.stderr)
                continue
            r = json.loads(line[-1][7:])
            rows.append(r)
            print(f"{r['engine']:<7} {r['model']:<6} {r['device']:<6} {r['sequences']:>5} {r['generated_tokens']:>7} "
                  f"{r['seconds']:>8.3f} {r['tokens_per_s']:>10.0f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory", help="peak memory of the hf engine's sampler log-probs, before vs after")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--vocab", type=int, default=151936)
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--new-tokens", type=int, default=128)
    m.add_argument("--prompt-len", type=int, default=32)
    m.add_argument("--worker", choices=("scores", "recorder"), help=argparse.SUPPRESS)
    m.add_argument("--json", default=None)
    sp = sub.add_parser("speed", help="rollout tokens/s of the hf and vllm engines on the same prompts")
    sp.add_argument("--engines", default="hf,vllm")
    sp.add_argument("--models", default="tiny,small", help=f"comma-separated: {', '.join(SPEED_MODELS)}")
    sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sp.add_argument("--prompts", type=int, default=8)
    sp.add_argument("--generations", type=int, default=8)
    sp.add_argument("--new-tokens", type=int, default=64)
    sp.add_argument("--iters", type=int, default=3)
    sp.add_argument("--kv-cache-gb", type=float, default=0.25)
    sp.add_argument("--threads", type=int, default=1, help="hf engine on the CPU: torch threads (0: torch's default)")
    sp.add_argument("--json", default=None)
    sp.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.what == "speed" and args.worker:
        print("RESULT " + json.dumps(_speed_worker(args)), flush=True)
        return 0
    if args.what == "speed":
        rows = speed(args)
    elif args.what == "memory":
        if args.worker:
            print("RESULT " + json.dumps(_memory_worker(args)), flush=True)
            return 0
        rows = memory(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
