"""Reference group advantage estimators (docs/ops-math.md, "group_advantages")."""

from __future__ import annotations

import torch

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "w_reinforce", "canon")
SCALES = ("group", "batch", "none")
DEFAULT_SCALE = {"grpo": "group", "dr_grpo": "none", "rloo": "none", "w_reinforce": "none", "canon": "group"}


def resolve_scale(estimator: str, scale: str | None) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: got {estimator!r}; accepted: {', '.join(ESTIMATORS)}")
    if scale is None:
        return DEFAULT_SCALE[estimator]
    if scale not in SCALES:
        raise ValueError(f"scale: got {scale!r}; accepted: {', '.join(SCALES)} or None (the estimator's default)")
    if estimator == "dr_grpo" and scale != "none":
        raise ValueError("scale: Dr. GRPO removes the std normalisation; use scale='none' or estimator='grpo'")
    return scale


def _segment_sum(values: torch.Tensor, inv: torch.Tensor, n_groups: int) -> torch.Tensor:
    return torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, inv, values)


def _group_mean_std(r, valid, inv, n_groups):
    """Per-group count, mean and unbiased std over valid members (std 0 when count < 2)."""
    dt = r.dtype
    w = valid.to(dt)
    rz = torch.where(valid, r, torch.zeros_like(r))
    n = _segment_sum(w, inv, n_groups)
    mean = _segment_sum(rz, inv, n_groups) / n.clamp_min(1)
    dev = torch.where(valid, r - mean[inv], torch.zeros_like(r))
    var = _segment_sum(dev * dev, inv, n_groups) / (n - 1).clamp_min(1)
    std = torch.where(n > 1, var.sqrt(), torch.zeros_like(var))
    return n, mean, std


def group_advantages(rewards: torch.Tensor, group_index: torch.Tensor, *, estimator: str = "grpo",
                     scale: str | None = None, eps: float = 1e-6, positive_weight: float = 0.1,
                     metric: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and validity of B rewards (NaN = missing) in groups of responses to the same prompt.

    ``positive_weight`` is W-REINFORCE's lambda; ``metric`` is the per-response quantity CANON splits each
    group by (e.g. response length or mean entropy). Returns (advantages fp32[B] (fp64 for fp64 rewards),
    valid bool[B]); missing rewards get advantage 0 and ``valid=False``.
    """
    scale = resolve_scale(estimator, scale)
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected shape [B], got {tuple(rewards.shape)}")
    if group_index.shape != rewards.shape:
        raise ValueError(f"group_index: expected shape {tuple(rewards.shape)}, got {tuple(group_index.shape)}")
    if group_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"group_index: expected an integer tensor, got {group_index.dtype}")
    if estimator == "canon" and (metric is None or metric.shape != rewards.shape):
        raise ValueError("metric: estimator='canon' needs a per-response metric of the same shape as rewards")
    out_dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    # statistics in float64 whatever the input: B is small, and an fp32 mean of equal rewards can differ
    # from them by one ulp, which the std division would blow up
    dt = torch.float64
    r = rewards.to(dt)
    valid = ~torch.isnan(r)
    if r.numel() == 0:
        return torch.zeros(0, dtype=out_dt, device=r.device), valid
    _, inv = torch.unique(group_index, return_inverse=True)
    n_groups = int(inv.max()) + 1
    n, mean, std = _group_mean_std(r, valid, inv, n_groups)
    zero = torch.zeros_like(r)
    big = torch.full((n_groups,), float("inf"), dtype=dt, device=r.device)
    g_max = (-big).scatter_reduce(0, inv, torch.where(valid, r, -big[inv]), "amax")
    g_min = big.scatter_reduce(0, inv, torch.where(valid, r, big[inv]), "amin")
    all_equal = (g_max == g_min)[inv]
    if estimator in ("grpo", "dr_grpo"):
        c = r - mean[inv]
    elif estimator == "rloo":
        k = n[inv]
        c = torch.where(k > 1, (r - mean[inv]) * k / (k - 1).clamp_min(1), zero)
    elif estimator == "w_reinforce":
        c = positive_weight * r - (1.0 - r)
    else:  # canon
        m = metric.to(dt)
        # group median of the metric over valid members (lower median, like torch.median)
        med = torch.empty(n_groups, dtype=dt, device=r.device)
        for g in range(n_groups):
            sel = (inv == g) & valid
            med[g] = m[sel].median() if bool(sel.any()) else 0.0
        high = m > med[inv]
        c = torch.empty_like(r)
        for part in (high, ~high):
            other = (~part) & valid
            n_o = _segment_sum(other.to(dt), inv, n_groups)
            s_o = _segment_sum(torch.where(other, r, zero), inv, n_groups)
            mean_o = torch.where(n_o > 0, s_o / n_o.clamp_min(1), mean)
            c = torch.where(part, r - mean_o[inv], c)
    if estimator != "w_reinforce":  # centred estimators: a group of equal rewards carries no signal
        c = torch.where(all_equal, zero, c)
    one = torch.ones((), dtype=dt, device=r.device)
    if scale == "group":
        std_t = std[inv]
    elif scale == "batch":
        rv = r[valid]
        std_t = rv.std() if rv.numel() > 1 else torch.zeros((), dtype=dt, device=r.device)
    else:
        std_t = None
    # A spread of 0 leaves c unscaled: centred estimators have c = 0 there anyway, W-REINFORCE keeps its
    # +lambda / -1 (dividing by eps would blow it up, and eps = 0 would give NaN).
    a = c if std_t is None else c / torch.where(std_t > 0, std_t + eps, one)
    return torch.where(valid, a, zero).to(out_dt), valid
