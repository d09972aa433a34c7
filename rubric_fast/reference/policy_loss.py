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
        # masked tokens get ratio 1: a padded token's garbage log-ratio must not overflow into inf / NaN
        ratio = torch.exp(torch.where(mask, lp - olp, torch.zeros_like(lp)))

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

    # tokens of weight 0 do not count even where their loss is inf or NaN (padding with garbage log-probs)
    wl = torch.where(mask, w * per_tok, torch.zeros_like(per_tok))
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
        z = torch.zeros_like(r)
        stats = PolicyLossStats(
            clip_frac_low=((r < lo) & (a < 0) & mask).float().sum() / cnt,
            clip_frac_high=((r > hi) & (a > 0) & mask).float().sum() / cnt,
            kl_mean=(torch.where(mask, kl.detach().float(), z).sum() / cnt if kl is not None
                     else torch.zeros((), device=lp.device)),
            ratio_mean=torch.where(mask, r, z).sum() / cnt,
        )
        del m
    return loss, stats


def _min_grad(a, b, da, db):
    """d min(a, b): the smaller side's derivative; half of each at a tie (as torch.minimum's autograd)."""
    return torch.where(a < b, da, torch.where(b < a, db, 0.5 * (da + db)))


def policy_loss_with_grads(logp, old_logp, advantages, loss_weight, *, ref_logp=None, is_weight=None,
                           seq_index=None, config: PolicyLossConfig, entropy=None, entropy_mask=None):
    """(loss, stats f32[4], dL/dlogp [N], dL/dentropy [N]) in closed form: what the native kernels compute.

    Values come from :func:`policy_loss`; the per-token gradients are written out by hand (tests check
    them against autograd through :func:`policy_loss`).
    """
    cfg = config
    with torch.no_grad():
        loss, stats = policy_loss(logp.detach(), old_logp, advantages, loss_weight, ref_logp=ref_logp,
                                  is_weight=is_weight, seq_index=seq_index, config=cfg,
                                  entropy=None if entropy is None else entropy.detach(), entropy_mask=entropy_mask)
        n = logp.shape[0]
        dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
        lp, olp, adv, w = (t.detach().to(dt) for t in (logp, old_logp, advantages, loss_weight))
        mask = w != 0
        zero = torch.zeros_like(lp)
        needs_seq = cfg.loss == "gspo" or cfg.aggregation in ("seq_mean_token_mean", "seq_mean_token_sum")
        inv, n_seq = _segments(seq_index, n) if needs_seq else (None, 0)
        if cfg.loss == "gspo":
            lr = torch.where(mask, lp - olp, zero)
            cnt = _seg_sum(mask.to(dt), inv, n_seq)
            rho = torch.exp((_seg_sum(lr, inv, n_seq) / cnt.clamp_min(1))[inv])
        else:
            rho = torch.exp(torch.where(mask, lp - olp, zero))
        lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
        # d rho / d logp = rho for both the token ratio and the GSPO-token ratio
        if cfg.loss in ("ppo_clip", "gspo"):
            if cfg.delta is not None:
                r1 = torch.clamp(rho, max=cfg.delta)
                d_r1 = torch.where(rho <= cfg.delta, rho, zero)
            else:
                r1, d_r1 = rho, rho
            u, c = r1 * adv, torch.clamp(rho, lo, hi) * adv
            d_c = torch.where((rho >= lo) & (rho <= hi), rho, zero) * adv
            m = torch.minimum(u, c)
            d_pg = -_min_grad(u, c, d_r1 * adv, d_c)
            if cfg.dual_clip is not None:
                pg, cap = -m, -cfg.dual_clip * adv
                d_pg = torch.where(adv < 0, _min_grad(pg, cap, d_pg, zero), d_pg)
        elif cfg.loss == "cispo":
            d_pg = -torch.clamp(rho, max=hi) * adv
        else:
            tau = torch.where(adv > 0, torch.full_like(adv, cfg.sapo_tau_pos), torch.full_like(adv, cfg.sapo_tau_neg))
            s = torch.sigmoid(tau * (rho - 1.0))
            d_pg = -4.0 * s * (1.0 - s) * rho * adv
        if is_weight is not None:
            d_pg = d_pg * is_weight.detach().to(dt)
        d_tok = d_pg
        if ref_logp is not None and cfg.beta > 0:
            d = ref_logp.detach().to(dt) - lp
            d_kl = torch.ones_like(d) if cfg.kl == "k1" else (-d if cfg.kl == "k2" else 1.0 - torch.exp(d))
            d_tok = d_tok + cfg.beta * d_kl
        d_ent = torch.full_like(lp, -cfg.entropy_coef)
        if entropy_mask is not None:
            em = entropy_mask.detach().to(dt)
            d_tok, d_ent = d_tok * em, d_ent * em
        # aggregation coefficient of each token
        if cfg.aggregation in ("token_mean", "constant"):
            denom = float(cfg.normalizer) if cfg.normalizer is not None else float(w.sum())
            coef = w / denom if denom != 0 else zero
        else:
            s_w = _seg_sum(w, inv, n_seq)
            live = s_w != 0
            denom = float(cfg.normalizer) if cfg.normalizer is not None else float(live.sum())
            per_tok = w / torch.where(live, s_w, 1.0)[inv] if cfg.aggregation == "seq_mean_token_mean" else w
            coef = per_tok / denom if denom != 0 else zero
        g_lp = torch.where(mask, coef * d_tok, zero)
        g_ent = torch.where(mask, coef * d_ent, zero) if entropy is not None else zero
        return loss, torch.stack(list(stats)).float(), g_lp, g_ent
