"""`rubric-fast bench --plan N,H,V`: the schedule each benchmark case would take, without a GPU.

For each shape: the fused fwd+bwd of log-prob + clipped token loss (all rows get a gradient), the top-20%
entropy case, and the no-grad forward; with the chosen schedule, row blocks, GEMM FLOPs as a multiple of
the three-GEMM floor, the logits workspace, the peak extra memory (dX and dW included) and an estimate of
the HBM traffic. Everything comes from kernels/plan.py, the functions the launchers themselves call.
"""

from __future__ import annotations

import torch

from .kernels import plan
from .kernels.fused_linear_policy_loss import choose_schedule
from .reference.types import PolicyLossConfig


def plans_for(n: int, h: int, v: int, *, dtype: torch.dtype = torch.bfloat16, arch: int = 90,
              top_fraction: float = 0.2) -> list[tuple[str, plan.FusedPlan]]:
    out = []
    full = PolicyLossConfig()
    sched = choose_schedule(full, entropy_mask_given=False, needs_grad=True)
    out.append(("fwd+bwd, ppo_clip token_mean", plan.plan_fused(n, h, v, dtype=dtype, arch=arch, schedule=sched)))
    top = PolicyLossConfig(top_entropy_fraction=top_fraction)
    sched = choose_schedule(top, entropy_mask_given=False, needs_grad=True)
    n_act = max(1, round(top_fraction * n))
    out.append((f"fwd+bwd, top {top_fraction:.0%} entropy",
                plan.plan_fused(n, h, v, dtype=dtype, arch=arch, schedule=sched, n_active=n_act)))
    out.append(("forward only (no grad)", plan.plan_fused(n, h, v, dtype=dtype, arch=arch, schedule="forward")))
    return out


def show(shapes, *, dtype: torch.dtype = torch.bfloat16, arch: int = 90) -> str:
    parts = []
    for n, h, v in shapes:
        for title, p in plans_for(n, h, v, dtype=dtype, arch=arch):
            parts.append(f"[{title}]\n{plan.format_plan(p)}")
    return "\n".join(parts)
