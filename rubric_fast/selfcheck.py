"""Run every available backend of every op against the float64 reference on fresh random inputs.

``python -m rubric_fast.selfcheck`` (or ``rubric-fast selfcheck``) prints one row per (op, backend,
device, dtype) with the largest error against the reference and PASS / FAIL; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from . import ops
from . import reference as R


def _devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def _backends_for(device: str) -> list[str]:
    avail = ops.available_backends()
    if device == "cpu":
        return [b for b in ("torch", "cpu", "triton") if b in avail and (b != "triton" or ops.backend.triton_interpreted())]
    return [b for b in ("torch", "cuda", "triton") if b in avail]


def _max_err(a, b):
    if a.numel() == 0:
        return 0.0
    a, b = a.detach(), b.detach()
    d = (a.double() - b.double()).abs()
    return float("nan") if torch.isnan(a).any() else float(d.max())


def check(device: str, backend: str, dtype: torch.dtype, n: int = 37, h: int = 24, v: int = 301) -> list[tuple]:
    """Errors of each op on `backend` against the reference (fp64 in for the reference)."""
    rows = []
    g = torch.Generator().manual_seed(int(time.time_ns() % (1 << 31)))
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(h)
    b = torch.randn(v, generator=g, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100
    lw = (t != -100).double()
    ref_lp, ref_ent, ref_lse = R.linear_logprob_entropy_materialized(x, w, t, bias=b, temperature=0.8)
    old = ref_lp + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    seq = torch.arange(n) // 6
    cfg = R.PolicyLossConfig(loss="ppo_clip", eps_high=0.28, beta=0.01, entropy_coef=0.001,
                             aggregation="seq_mean_token_mean")
    tol = 1e-9 if dtype == torch.float64 else (2e-4 if dtype == torch.float32 else 5e-2)

    def dev(z):
        return z.to(device)

    with ops.use_backend(backend):
        xs, ws, bs = (dev(z.to(dtype)).detach().clone().requires_grad_(True) for z in (x, w, b))
        lp, ent, lse = ops.linear_logprob_entropy(xs, ws, dev(t), bias=bs, temperature=0.8)
        err = max(_max_err(lp.cpu(), ref_lp), _max_err(ent.cpu(), ref_ent), _max_err(lse.cpu(), ref_lse))
        rows.append(("linear_logprob_entropy", err, tol * 10))
        vdt = torch.float64 if dtype == torch.float64 else torch.float32
        loss, _, _, _ = ops.fused_linear_policy_loss(xs, ws, dev(t), dev(old.to(vdt)), dev(adv.to(vdt)),
                                                     dev(lw.to(vdt)), ref_logp=dev(old.to(vdt)), seq_index=dev(seq),
                                                     config=cfg, bias=bs, temperature=0.8)
        loss.backward()
        xr, wr, br = (z.detach().clone().requires_grad_(True) for z in (x, w, b))
        ref_loss, _, _, _ = R.fused_linear_policy_loss(xr, wr, t, old, adv, lw, ref_logp=old, seq_index=seq,
                                                       config=cfg, bias=br, temperature=0.8)
        ref_loss.backward()
        rows.append(("fused_linear_policy_loss", abs(loss.item() - ref_loss.item()), tol * 10))
        gerr = max(_max_err(a.grad.cpu(), r.grad) / (float(r.grad.abs().max()) + 1e-12)
                   for a, r in ((xs, xr), (ws, wr), (bs, br)))
        rows.append(("fused_linear_policy_loss (grad, rel)", gerr, tol * 30))
        r = torch.rand(24, generator=g, dtype=torch.float64)
        r[3] = float("nan")
        gi = torch.randint(0, 5, (24,), generator=g)
        a, _ = ops.group_advantages(dev(r.to(dtype) if dtype != torch.bfloat16 else r.float()), dev(gi))
        ra, _ = R.group_advantages(r, gi)
        rows.append(("group_advantages", _max_err(a.cpu(), ra), tol * 100))
        e = torch.randint(0, 7, (101,), generator=g).float()
        valid = torch.rand(101, generator=g) > 0.3
        m = ops.entropy_mask(dev(e), dev(valid), 0.2)
        rows.append(("entropy_mask (mismatches)", float((m.cpu() != R.entropy_mask(e, valid, 0.2)).sum()), 0.0))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", action="append", choices=["float64", "float32", "bfloat16"],
                        help="dtypes to check (default: float64 and float32)")


def run(args) -> int:
    dtypes = [getattr(torch, d) for d in (args.dtype or ["float64", "float32"])]
    print(f"rubric_fast selfcheck: torch {torch.__version__}; backends available: {', '.join(ops.available_backends())}")
    header = f"{'op':40s} {'backend':8s} {'device':6s} {'dtype':9s} {'max error':>11s} {'tolerance':>10s}  result"
    print(header)
    print("-" * len(header))
    failed = 0
    for device in _devices():
        for backend in _backends_for(device):
            for dtype in dtypes:
                if dtype == torch.float64 and backend == "triton":
                    continue
                for name, err, tol in check(device, backend, dtype):
                    ok = not math.isnan(err) and err <= tol
                    failed += not ok
                    print(f"{name:40s} {backend:8s} {device:6s} {str(dtype)[6:]:9s} {err:11.3e} {tol:10.1e}  "
                          f"{'PASS' if ok else 'FAIL'}")
    print(f"{'all checks passed' if not failed else f'{failed} check(s) FAILED'}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rubric_fast.selfcheck", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
