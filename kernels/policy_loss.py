"""GRPO-family policy losses with their per-token gradients in one elementwise pass.

Math: docs/ops-math.md, "policy_loss". The aggregation is folded into a per-token coefficient c_t with
L = sum_t c_t l_t (token_mean: w/D; seq_mean_token_mean: w/(W_s D); seq_mean_token_sum: w/D; constant:
w/normalizer); the per-sequence sums (GSPO's sequence log-ratio, W_s, |S|) are torch segment sums on the
host, everything per token is one Triton kernel that writes dL/dlogp, dL/dentropy and per-block partial
sums of the loss and the four statistics (summed on the host: deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.types import PolicyLossConfig
from . import plan
from ._common import f32, new_empty

LOSS_PPO, LOSS_CISPO, LOSS_SAPO, LOSS_GSPO = 0, 1, 2, 3
KL_K1, KL_K2, KL_K3 = 0, 1, 2
AGG_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_SUM, AGG_CONSTANT = 0, 1, 2, 3


@triton.jit
def _policy_loss_kernel(logp_ptr, old_ptr, adv_ptr, w_ptr, coef_ptr, lr_ptr, ref_ptr, isw_ptr, ent_ptr, emask_ptr,
                        gl_ptr, gh_ptr, part_ptr, N,
                        eps_low, eps_high, delta, dual_clip, beta, entropy_coef, tau_pos, tau_neg,
                        LOSS: tl.constexpr, KL: tl.constexpr, HAS_LR: tl.constexpr, HAS_DELTA: tl.constexpr,
                        HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, HAS_ISW: tl.constexpr,
                        HAS_ENT: tl.constexpr, HAS_EMASK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    lp = tl.load(logp_ptr + offs, mask=m, other=0.0).to(tl.float32)
    olp = tl.load(old_ptr + offs, mask=m, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    c = tl.load(coef_ptr + offs, mask=m, other=0.0)
    counts = m & (w != 0.0)
    if HAS_LR:  # GSPO: the sequence's mean log-ratio, the token carries the gradient (d rho / d logp = rho)
        lr = tl.load(lr_ptr + offs, mask=m, other=0.0)
    else:
        lr = lp - olp
    lr = tl.where(counts, lr, 0.0)
    rho = tl.exp(lr)
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    if LOSS == 1:  # CISPO: -sg(min(rho, 1 + eps_high)) A logp
        wt = tl.minimum(rho, hi)
        pg = -wt * adv * lp
        dpg = -wt * adv
    elif LOSS == 2:  # SAPO: -(4 / tau) sigmoid(tau (rho - 1)) A
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        sg = tl.sigmoid(tau * (rho - 1.0))
        pg = -(4.0 / tau) * sg * adv
        dpg = -4.0 * sg * (1.0 - sg) * rho * adv
    else:  # PPO clip (and GSPO with the sequence ratio)
        r1 = rho
        d1 = rho
        if HAS_DELTA:
            r1 = tl.minimum(rho, delta)
            d1 = tl.where(rho <= delta, rho, 0.0)
        rc = tl.minimum(tl.maximum(rho, lo), hi)
        dc = tl.where((rho >= lo) & (rho <= hi), rho, 0.0)
        a1 = r1 * adv
        a2 = rc * adv
        first = a1 <= a2
        pg = -tl.where(first, a1, a2)
        dpg = -adv * tl.where(first, d1, dc)
        if HAS_DUAL:
            cap = -dual_clip * adv
            capped = (adv < 0) & (pg > cap)
            pg = tl.where(capped, cap, pg)
            dpg = tl.where(capped, 0.0, dpg)
    if HAS_ISW:
        isw = tl.load(isw_ptr + offs, mask=m, other=0.0).to(tl.float32)
        pg = pg * isw
        dpg = dpg * isw
    kl = tl.zeros((BLOCK,), tl.float32)
    if HAS_REF:
        d = tl.load(ref_ptr + offs, mask=m, other=0.0).to(tl.float32) - lp
        d = tl.where(counts, d, 0.0)
        if KL == 0:
            kl = -d
            dkl = tl.full((BLOCK,), 1.0, tl.float32)
        elif KL == 1:
            kl = 0.5 * d * d
            dkl = -d
        else:
            ed = tl.exp(d)
            kl = ed - d - 1.0
            dkl = 1.0 - ed
        pg = pg + beta * kl
        dpg = dpg + beta * dkl
    dh = tl.zeros((BLOCK,), tl.float32) - entropy_coef
    if HAS_ENT:
        pg = pg - entropy_coef * tl.load(ent_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_EMASK:
        em = tl.load(emask_ptr + offs, mask=m, other=0).to(tl.float32)
        pg = pg * em
        dpg = dpg * em
        dh = dh * em
    live = m & (c != 0.0)
    tl.store(gl_ptr + offs, tl.where(live, c * dpg, 0.0), mask=m)
    tl.store(gh_ptr + offs, tl.where(live, c * dh, 0.0), mask=m)
    fc = tl.where(counts, 1.0, 0.0)
    base = part_ptr + pid * 5
    tl.store(base, tl.sum(tl.where(live, c * pg, 0.0), axis=0))
    tl.store(base + 1, tl.sum(fc * tl.where((rho < lo) & (adv < 0), 1.0, 0.0), axis=0))
    tl.store(base + 2, tl.sum(fc * tl.where((rho > hi) & (adv > 0), 1.0, 0.0), axis=0))
    tl.store(base + 3, tl.sum(fc * kl, axis=0))
    tl.store(base + 4, tl.sum(fc * rho, axis=0))


def _segments(seq_index, n, device):
    if seq_index is None:
        raise ValueError("seq_index: required for loss_type=gspo (3) and the seq_mean_* aggregations (1, 2)")
    _, inv = torch.unique(seq_index, return_inverse=True)
    n_seq = int(inv.max()) + 1 if n else 0
    return inv, n_seq


def _seg_sum(values, inv, n_seq):
    return torch.zeros(n_seq, dtype=values.dtype, device=values.device).index_add_(0, inv, values)


def token_coefficients(loss_weight, seq_index, aggregation: int, normalizer: float, inv=None, n_seq=0):
    """c_t with L = sum_t c_t l_t for the aggregation (0 where the normalizer is 0)."""
    w = loss_weight.float()
    n = w.shape[0]
    if aggregation in (AGG_TOKEN_MEAN, AGG_CONSTANT):
        if aggregation == AGG_CONSTANT and not normalizer > 0:
            raise ValueError("normalizer: aggregation=constant (3) needs a normalizer > 0")
        d = torch.full((), float(normalizer), device=w.device) if normalizer > 0 else w.sum()
        return torch.where(d != 0, w / torch.where(d != 0, d, 1.0), torch.zeros_like(w))
    if aggregation not in (AGG_SEQ_MEAN_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_SUM):
        raise ValueError(f"aggregation: expected 0..3, got {aggregation}")
    if inv is None:
        inv, n_seq = _segments(seq_index, n, w.device)
    s_w = _seg_sum(w, inv, n_seq)
    live = s_w != 0
    d = torch.full((), float(normalizer), device=w.device) if normalizer > 0 else live.sum().float()
    d_ok = torch.where(d != 0, d, 1.0)
    if aggregation == AGG_SEQ_MEAN_TOKEN_MEAN:
        per_seq = torch.where(live, 1.0 / torch.where(live, s_w, 1.0), torch.zeros_like(s_w))
        c = w * per_seq[inv] / d_ok
    else:
        c = w / d_ok
    return torch.where(d != 0, c, torch.zeros_like(c))


def policy_token_grads(cfg: PolicyLossConfig, lp, old_logp, advantages, w, coef, lr_tok=None, ref_logp=None,
                       is_weight=None, entropy=None, entropy_mask=None):
    """The elementwise pass with given coefficients c_t: (grad_logp, grad_entropy, partial sums [blocks, 5])."""
    n = lp.shape[0]
    dev = lp.device
    lp = lp.float().contiguous()
    w = w.contiguous()
    coef = coef.contiguous()
    delta, dual = cfg.delta or 0.0, cfg.dual_clip or 0.0
    spec = plan.policy_loss_launch(n, loss=cfg.loss_code, kl=cfg.kl_code, has_lr=lr_tok is not None,
                                   has_delta=delta > 0, has_dual=dual > 0, has_ref=ref_logp is not None,
                                   has_isw=is_weight is not None, has_ent=entropy is not None,
                                   has_emask=entropy_mask is not None)
    grad_logp = new_empty((n,), torch.float32, dev)
    grad_ent = new_empty((n,), torch.float32, dev)
    part = new_empty((spec.grid[0], 5), torch.float32, dev)
    if n == 0:
        part.zero_()
    else:
        dummy = lp
        _policy_loss_kernel[spec.grid](
            lp, old_logp.contiguous(), advantages.contiguous(), w, coef,
            lr_tok if lr_tok is not None else dummy,
            ref_logp.contiguous() if ref_logp is not None else dummy,
            is_weight.contiguous() if is_weight is not None else dummy,
            entropy.contiguous() if entropy is not None else dummy,
            entropy_mask.contiguous() if entropy_mask is not None else dummy,
            grad_logp, grad_ent, part, n,
            f32(cfg.eps_low), f32(cfg.eps_high), f32(delta), f32(dual), f32(cfg.beta), f32(cfg.entropy_coef),
            f32(cfg.sapo_tau_pos), f32(cfg.sapo_tau_neg), **spec.constexprs, num_warps=spec.num_warps,
            num_stages=spec.num_stages)
    return grad_logp, grad_ent, part


def unpack(fparams, iparams) -> PolicyLossConfig:
    """The packed config (PolicyLossConfig.to_op_args) as the dataclass, validated."""
    return fparams if isinstance(fparams, PolicyLossConfig) else PolicyLossConfig.from_op_args(fparams, iparams)


def policy_loss_fwd_bwd(logp, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index, entropy,
                        entropy_mask, fparams, iparams=None):
    """-> (loss 0-dim f32, stats f32[4] = clip_frac_low, clip_frac_high, kl_mean, ratio_mean,
    grad_logp f32[N], grad_entropy f32[N]) for an upstream gradient of 1.

    ``fparams, iparams``: the packed PolicyLossConfig (``cfg.to_op_args()``; a PolicyLossConfig is accepted
    too). entropy / ref_logp / is_weight / entropy_mask may be None."""
    cfg = unpack(fparams, iparams)
    n = logp.shape[0]
    dev = logp.device
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError("ref_logp: required when beta > 0")
    if cfg.entropy_coef != 0 and entropy is None:
        raise ValueError("entropy: required when entropy_coef != 0")
    loss_type, aggregation = cfg.loss_code, cfg.aggregation_code
    needs_seq = loss_type == LOSS_GSPO or aggregation in (AGG_SEQ_MEAN_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_SUM)
    inv, n_seq = _segments(seq_index, n, dev) if needs_seq else (None, 0)
    lp = logp.float().contiguous()
    w = loss_weight.float().contiguous()
    coef = token_coefficients(w, seq_index, aggregation, cfg.normalizer or 0.0, inv, n_seq).contiguous()
    lr_tok = None
    if loss_type == LOSS_GSPO:
        mask = (w != 0).float()
        lr = (lp - old_logp.float()) * mask
        lr = torch.where(w != 0, lr, torch.zeros_like(lr))
        seq_lr = _seg_sum(lr, inv, n_seq) / _seg_sum(mask, inv, n_seq).clamp_min(1)
        lr_tok = seq_lr[inv].contiguous()
    grad_logp, grad_ent, part = policy_token_grads(cfg, lp, old_logp, advantages, w, coef, lr_tok, ref_logp,
                                                   is_weight, entropy, entropy_mask)
    sums = part.sum(0)
    cnt = (w != 0).sum().float().clamp_min(1.0)
    stats = sums[1:] / cnt
    return sums[0], stats, grad_logp, grad_ent
