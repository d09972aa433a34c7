"""Reference GRPO-family policy losses (docs/ops-math.md, "policy_loss").

Plain differentiable torch: autograd gives the gradient the kernels must reproduce. Methods:
PPO clip (Schulman et al. 2017), clip-higher (DAPO, Yu et al. 2025), two-sided clip ``delta``
(INTELLECT-2 / TRL), dual-clip (Ye et al. 2020), CISPO (MiniMax-M1 2025), SAPO (Gao et al. 2025),
GSPO-token (Zheng et al. 2025), KL estimators k1/k2/k3 (Schulman 2020), Dr. GRPO constant normalizer
(Liu et al. 2025), truncated importance sampling against the sampler (Yao et al. 2025).
"""

from __future__ import annotations

import torch

from .types import PolicyLossConfig, PolicyLossStats


def truncated_importance_weight(old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """min(pi_old / pi_sampler, cap), detached: corrects for a sampler (vLLM, another dtype) that differs
    from the trainer's old policy (truncated IS, Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training")."""
    if not cap > 0:
        raise ValueError(f"cap: must be > 0, got {cap}")
    return torch.exp(old_logp.detach().float() - sampler_logp.detach().float()).clamp(max=cap)


def _check_same(name, t, n):
    if t is not None and t.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(t.shape)}")


def kl_estimate(logp, ref_logp, kind: str):
    d = ref_logp - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1.0


def _segments(seq_index, n):
    if seq_index is None:
        raise ValueError("seq_index: required for loss='gspo' and the seq_mean_* aggregations")
    _, inv = torch.unique(seq_index, return_inverse=True)
    return inv, (int(inv.max()) + 1 if n else 0)


def _seg_sum(values, inv, n_seq):
    return torch.zeros(n_seq, dtype=values.dtype, device=values.device).index_add(0, inv, values)


def policy_loss(logp, old_logp, advantages, loss_weight, *, ref_logp=None, is_weight=None, seq_index=None,
                config: PolicyLossConfig, entropy=None, entropy_mask=None):
    """Scalar loss and :class:`PolicyLossStats` of one batch of N tokens (fp64 in -> fp64 loss)."""
    n = logp.shape[0]
    if logp.dim() != 1:
        raise ValueError(f"logp: expected shape [N], got {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("loss_weight", loss_weight),
                    ("ref_logp", ref_logp), ("is_weight", is_weight), ("seq_index", seq_index),
                    ("entropy", entropy), ("entropy_mask", entropy_mask)):
        _check_same(name, t, n)
    cfg = config
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError("ref_logp: required when config.beta > 0")
    if cfg.entropy_coef != 0 and entropy is None:
        raise ValueError("entropy: required when config.entropy_coef != 0")
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    lp = logp.to(dt)
    olp = old_logp.detach().to(dt)
    adv = advantages.detach().to(dt)
    w = loss_weight.detach().to(dt)
    mask = w != 0

    needs_seq = cfg.loss == "gspo" or cfg.aggregation in ("seq_mean_token_mean", "seq_mean_token_sum")
    inv, n_seq = _segments(seq_index, n) if needs_seq else (None, 0)

    if cfg.loss == "gspo":
        lr = torch.where(mask, lp.detach() - olp, torch.zeros_like(lp))
        cnt = _seg_sum(mask.to(dt), inv, n_seq)
        seq_lr = _seg_sum(lr, inv, n_seq) / cnt.clamp_min(1)
        ratio = torch.exp(seq_lr[inv]) * torch.exp(lp - lp.detach())
    else:
        ratio = torch.exp(lp - olp)

    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    if cfg.loss in ("ppo_clip", "gspo"):
        r1 = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
        pg = -torch.minimum(r1 * adv, torch.clamp(ratio, lo, hi) * adv)
        if cfg.dual_clip is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -cfg.dual_clip * adv), pg)
    elif cfg.loss == "cispo":
        pg = -torch.clamp(ratio, max=hi).detach() * adv * lp
    else:  # sapo
        tau = torch.where(adv > 0, torch.full_like(adv, cfg.sapo_tau_pos), torch.full_like(adv, cfg.sapo_tau_neg))
        pg = -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)) * adv
    if is_weight is not None:
        pg = pg * is_weight.detach().to(dt)
    per_tok = pg
    kl = None
    if ref_logp is not None:
        kl = kl_estimate(lp, ref_logp.detach().to(dt), cfg.kl)
        if cfg.beta > 0:
            per_tok = per_tok + cfg.beta * kl
    if cfg.entropy_coef != 0:
        per_tok = per_tok - cfg.entropy_coef * entropy.to(dt)
    if entropy_mask is not None:
        per_tok = per_tok * entropy_mask.detach().to(dt)

    wl = w * per_tok
    zero = torch.zeros((), dtype=dt, device=lp.device)
    if cfg.aggregation in ("token_mean", "constant"):
        denom = torch.as_tensor(cfg.normalizer, dtype=dt) if cfg.normalizer is not None else w.sum()
        loss = torch.where(denom != 0, wl.sum() / torch.where(denom != 0, denom, 1.0), zero)
    else:
        s_num = _seg_sum(wl, inv, n_seq)
        s_w = _seg_sum(w, inv, n_seq)
        live = s_w != 0
        per_seq = torch.where(live, s_num / torch.where(live, s_w, 1.0), torch.zeros_like(s_num)) \
            if cfg.aggregation == "seq_mean_token_mean" else s_num
        denom = torch.as_tensor(cfg.normalizer, dtype=dt) if cfg.normalizer is not None else live.sum().to(dt)
        loss = torch.where(denom != 0, per_seq.sum() / torch.where(denom != 0, denom, 1.0), zero)

    with torch.no_grad():
        m = mask.to(torch.float32)
        cnt = m.sum().clamp_min(1)
        r = ratio.detach().float()
        a = adv.float()
        stats = PolicyLossStats(
            clip_frac_low=(((r < lo) & (a < 0)).float() * m).sum() / cnt,
            clip_frac_high=(((r > hi) & (a > 0)).float() * m).sum() / cnt,
            kl_mean=(kl.detach().float() * m).sum() / cnt if kl is not None else torch.zeros((), device=lp.device),
            ratio_mean=(r * m).sum() / cnt,
        )
    return loss, stats
