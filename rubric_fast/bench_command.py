"""`rubric-fast bench`: the kernel microbenchmark suite on whatever device is present.

Providers (fwd + bwd of linear -> log-prob / entropy -> GRPO loss, unless the case is forward-only):
  floor        the three bare GEMMs of forward + backward (X W^T, dz W, dz^T X), in the input dtype
  torch        materialized PyTorch: fp32 logits, log_softmax, gather, entropy, autograd
  torch_chunk  the row/vocabulary-chunked PyTorch reference (rubric_fast.reference), recompute backward
  ops          the public op rubric_fast.ops.fused_linear_policy_loss with autograd, on this device's backend
               (CPU: the C++ ops; GPU: the Triton kernels through the op layer)
  ours         the fused Triton launcher (rubric_fast.kernels.fused_linear_policy_loss), automatic schedule
  ours_1pass   the same, one-pass schedule forced (logits computed once, fp32 dW accumulated per row block)
  ours_2pass   the Triton forward + policy loss + recompute backward (the op path for GSPO / seq aggregations)
  liger        Liger-Kernel LigerFusedLinearGRPOLoss (when importable)
  cce          Cut Cross-Entropy linear_cross_entropy, log-prob only (when importable)
Figures: median ms, effective TFLOP/s (the floor's FLOPs over the time), peak extra memory (peak allocated
during the call minus what was allocated before it: gradients included), ratio to the floor. On a CPU the
suite runs tiny shapes with the ops and torch providers only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    h: int
    v: int
    grad: bool = True
    top_entropy_fraction: float | None = None


GPU_CASES = [
    Case("qwen-2k", 16384, 2048, 151936),
    Case("qwen-2k-nograd", 16384, 2048, 151936, grad=False),
    Case("qwen-2k-top20", 16384, 2048, 151936, top_entropy_fraction=0.2),
    Case("llama-4k", 8192, 4096, 128256),
]
CPU_CASES = [
    Case("tiny", 256, 64, 1000),
    Case("tiny-top20", 256, 64, 1000, top_entropy_fraction=0.2),
    Case("tiny-nograd", 256, 64, 1000, grad=False),
]
PROVIDERS = ["floor", "ops", "ours", "ours_1pass", "ours_2pass", "torch_chunk", "torch", "cce", "liger"]
CPU_PROVIDERS = ["floor", "ops", "torch", "torch_chunk"]


class Unavailable(Exception):
    pass


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def make_inputs(case: Case, dev, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(case.n, case.h, generator=g) * 0.5).to(dev, dtype)
    w = (torch.randn(case.v, case.h, generator=g) / math.sqrt(case.h)).to(dev, dtype)
    t = torch.randint(0, case.v, (case.n,), generator=g).to(dev)
    old = (-torch.rand(case.n, generator=g) * 8).to(dev)
    adv = torch.randn(case.n, generator=g).to(dev)
    lw = torch.ones(case.n, device=dev)
    return dict(x=x, w=w, t=t, old=old, adv=adv, lw=lw)


def floor_flops(case: Case) -> float:
    return (6.0 if case.grad else 2.0) * case.n * case.h * case.v


def _cfg(case):
    from rubric_fast.reference import PolicyLossConfig

    return PolicyLossConfig(loss="ppo_clip", aggregation="token_mean", top_entropy_fraction=case.top_entropy_fraction)


def _torch_selected_loss(case, logp, ent, inp):
    from rubric_fast import reference as ref

    cfg = _cfg(case)
    mask = None
    if case.top_entropy_fraction:
        mask = ref.entropy_mask(ent.detach().float(), inp["lw"] != 0, case.top_entropy_fraction)
    loss, _ = ref.policy_loss(logp, inp["old"], inp["adv"], inp["lw"], config=cfg.replace(top_entropy_fraction=None),
                              entropy=None, entropy_mask=mask)
    return loss


def provider_fn(name: str, case: Case, inp: dict):
    """A zero-argument callable doing one step of the provider on the case."""
    x, w, t = inp["x"], inp["w"], inp["t"]
    if name == "floor":
        def run():
            z = x @ w.T
            if case.grad:
                z @ w
                z.T @ x
        return run
    if name == "torch":
        def run():
            with torch.set_grad_enabled(case.grad):
                xr = x.detach().requires_grad_(case.grad)
                wr = w.detach().requires_grad_(case.grad)
                z = (xr @ wr.T).float()
                lsm = torch.log_softmax(z, -1)
                logp = lsm.gather(1, t[:, None]).squeeze(1)
                ent = -(lsm.exp() * lsm).sum(-1)
                if case.grad:
                    _torch_selected_loss(case, logp, ent, inp).backward()
        return run
    if name == "torch_chunk":
        from rubric_fast.reference import linear_logprob_entropy

        def run():
            with torch.set_grad_enabled(case.grad):
                xr = x.detach().requires_grad_(case.grad)
                wr = w.detach().requires_grad_(case.grad)
                logp, ent, _ = linear_logprob_entropy(xr, wr, t)
                if case.grad:
                    _torch_selected_loss(case, logp, ent, inp).backward()
        return run
    if name == "ops":
        # the public op with autograd, on the backend chosen for this device (CPU: C++; GPU: Triton)
        from rubric_fast import ops as rf_ops

        cfg = _cfg(case)

        def run():
            with torch.set_grad_enabled(case.grad):
                xr = x.detach().requires_grad_(case.grad)
                wr = w.detach().requires_grad_(case.grad)
                if not case.grad:
                    rf_ops.linear_logprob_entropy(xr, wr, t)
                    return
                loss, _, _, _ = rf_ops.fused_linear_policy_loss(xr, wr, t, inp["old"], inp["adv"], inp["lw"],
                                                                config=cfg)
                loss.backward()
        return run
    if name == "ours_1pass":
        if not case.grad:
            raise Unavailable("forward-only: same as ours")
        import os

        inner = provider_fn("ours", case, inp)

        def run():
            old = os.environ.get("RUBRIC_FAST_FUSED_SCHEDULE")
            os.environ["RUBRIC_FAST_FUSED_SCHEDULE"] = "one_pass"
            try:
                inner()
            finally:
                if old is None:
                    os.environ.pop("RUBRIC_FAST_FUSED_SCHEDULE")
                else:
                    os.environ["RUBRIC_FAST_FUSED_SCHEDULE"] = old
        return run
    if name in ("ours", "ours_2pass"):
        if x.device.type != "cuda":
            raise Unavailable("Triton kernels need a GPU here")
        from rubric_fast.kernels.fused_linear_policy_loss import fused_linear_policy_loss_fwd_bwd
        from rubric_fast.kernels.linear_logprob_entropy import (
            linear_logprob_entropy_bwd,
            linear_logprob_entropy_fwd,
        )
        from rubric_fast.kernels.policy_loss import policy_loss_fwd_bwd

        cfg = _cfg(case)
        codes = (cfg.loss_code, cfg.eps_low, cfg.eps_high, 0.0, 0.0, 0.0, cfg.kl_code, 0.0, cfg.aggregation_code,
                 0.0, cfg.sapo_tau_pos, cfg.sapo_tau_neg)
        if not case.grad:
            return lambda: linear_logprob_entropy_fwd(x, w, t, None, 1.0, -100)
        if name == "ours":
            return lambda: fused_linear_policy_loss_fwd_bwd(
                x, w, t, inp["old"], inp["adv"], inp["lw"], None, None, None, None, *codes,
                case.top_entropy_fraction or 0.0, None, 1.0, -100, True, True, False)

        def run():
            from rubric_fast.kernels.fused_linear_policy_loss import top_entropy_mask

            logp, ent, lse = linear_logprob_entropy_fwd(x, w, t, None, 1.0, -100)
            mask = (top_entropy_mask(ent, inp["lw"] != 0, case.top_entropy_fraction)
                    if case.top_entropy_fraction else None)
            _, _, gl, gh = policy_loss_fwd_bwd(logp, inp["old"], inp["adv"], inp["lw"], None, None, None, None, mask,
                                               *codes)
            linear_logprob_entropy_bwd(x, w, t, None, lse, ent, gl, gh, 1.0, -100, True, True, False)
        return run
    if name == "liger":
        if x.device.type != "cuda":
            raise Unavailable("GPU only")
        if case.top_entropy_fraction:
            raise Unavailable("no entropy-selected mode")
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            raise Unavailable(f"liger-kernel not importable: {exc}") from None
        import os

        seq = 1024 if case.n % 1024 == 0 else case.n
        b = case.n // seq
        loss_mod = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False,
                                            compiled=os.environ.get("BENCH_LIGER_COMPILED", "1") == "1")
        ids = t.view(b, seq)
        am = torch.ones(b, seq, device=x.device, dtype=torch.long)
        adv_b = inp["adv"].view(b, seq)[:, 0].contiguous()
        old = inp["old"].view(b, seq)

        def run():
            with torch.set_grad_enabled(case.grad):
                xr = x.detach().view(b, seq, -1).requires_grad_(case.grad)
                wr = w.detach().requires_grad_(case.grad)
                out = loss_mod(xr, wr, ids, am, adv_b, old_per_token_logps=old)
                loss = out[0] if isinstance(out, tuple) else out
                if case.grad:
                    loss.backward()
        return run
    if name == "cce":
        if x.device.type != "cuda":
            raise Unavailable("GPU only")
        if case.top_entropy_fraction:
            raise Unavailable("no entropy-selected mode")
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"cut-cross-entropy not importable: {exc}") from None

        def run():
            with torch.set_grad_enabled(case.grad):
                xr = x.detach().requires_grad_(case.grad)
                wr = w.detach().requires_grad_(case.grad)
                nll = linear_cross_entropy(xr, wr, t, reduction="none")
                if case.grad:
                    (nll * inp["adv"]).mean().backward()
        return run
    raise ValueError(f"unknown provider {name!r}; accepted: {', '.join(PROVIDERS)}")


def measure(case: Case, provider: str, dev, dtype, reps: int = 5, warmup: int = 2) -> dict:
    row = dict(case=case.name, provider=provider, n=case.n, h=case.h, v=case.v, grad=case.grad,
               top_entropy_fraction=case.top_entropy_fraction, median_ms=None, tflops=None, peak_extra_gb=None,
               ratio_to_floor=None, note="")
    inp = make_inputs(case, dev, dtype)
    try:
        fn = provider_fn(provider, case, inp)
        for _ in range(warmup):
            fn()
        _sync(dev)
        times = []
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times.append((time.perf_counter() - t0) * 1e3)
        if dev.type == "cuda":
            row["peak_extra_gb"] = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 30
        row["median_ms"] = statistics.median(times)
        row["tflops"] = floor_flops(case) / (row["median_ms"] * 1e-3) / 1e12
    except Unavailable as exc:
        row["note"] = f"n/a: {exc}"
    except torch.OutOfMemoryError:
        row["note"] = "OOM"
    except Exception as exc:  # noqa: BLE001 - a failing anchor must not stop the table
        row["note"] = f"error: {type(exc).__name__}: {str(exc)[:120]}"
    finally:
        del inp
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run_suite(dev, cases, providers, dtype, reps=5, log=print, on_case=None) -> list[dict]:
    rows = []
    for case in cases:
        case_rows = []
        for p in providers:
            r = measure(case, p, dev, dtype, reps=reps)
            case_rows.append(r)
            log(f"  {case.name:>16} {p:>12}: "
                + (f"{r['median_ms']:.2f} ms" if r["median_ms"] is not None else r["note"]))
        floor = next((r["median_ms"] for r in case_rows if r["provider"] == "floor"), None)
        for r in case_rows:
            if floor and r["median_ms"]:
                r["ratio_to_floor"] = r["median_ms"] / floor
        rows.extend(case_rows)
        if on_case is not None:  # partial results survive a time limit
            on_case(rows)
    return rows


def to_markdown(rows: list[dict], device_name: str) -> str:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    out = [f"Device: {device_name}", "",
           "| case | N | H | V | grad | provider | median ms | TFLOP/s | peak extra GB | x floor | note |",
           "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['n']} | {r['h']} | {r['v']} | {'yes' if r['grad'] else 'no'} | "
                   f"{r['provider']} | {f(r['median_ms'], '.2f')} | {f(r['tflops'], '.3g')} | "
                   f"{f(r['peak_extra_gb'], '.2f')} | {f(r['ratio_to_floor'], '.2f')} | {r['note']} |")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all for the device)")
    parser.add_argument("--providers", default=None, help=f"comma-separated, from: {', '.join(PROVIDERS)}")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the rows as JSON to this file")
    parser.add_argument("--markdown", default=None, help="write the table as markdown to this file")


def run(args) -> int:
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    all_cases = GPU_CASES if gpu else CPU_CASES
    cases = all_cases
    if args.cases:
        names = args.cases.split(",")
        cases = [c for c in all_cases if c.name in names]
        if not cases:
            print(f"--cases: none of {names} known; accepted: {', '.join(c.name for c in all_cases)}", file=sys.stderr)
            return 2
    providers = args.providers.split(",") if args.providers else (PROVIDERS if gpu else CPU_PROVIDERS)
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        print(f"--providers: unknown {bad}; accepted: {', '.join(PROVIDERS)}", file=sys.stderr)
        return 2
    if "floor" not in providers:
        providers = ["floor", *providers]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if not gpu and dtype != torch.float32:
        dtype = torch.float32  # CPU matmuls in bf16 are not what anyone trains with
    name = torch.cuda.get_device_name(dev) if gpu else "cpu"
    print(f"rubric-fast bench on {name} ({args.dtype if gpu else 'fp32'}), torch {torch.__version__}")
    meta = dict(device=name, torch=torch.__version__, dtype=str(dtype), cases=[asdict(c) for c in cases])
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass

    def save(rows):
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(dict(meta=meta, rows=rows), fh, indent=1)
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(to_markdown(rows, name) + "\n")

    rows = run_suite(dev, cases, providers, dtype, reps=args.reps, on_case=save)
    print()
    print(to_markdown(rows, name))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rubric-fast bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
