"""linear -> log-prob / entropy -> (entropy selection) -> policy loss, forward and backward in one call.

Schedules (kernels/plan.py, docs/ops-math.md "Schedules"):

* ``fused``: each token's gradient coefficient depends only on its own row once the normalizer is known
  (every loss but GSPO, every aggregation: the per-sequence weights come from ``loss_weight`` alone, and no
  top-entropy selection left to do). The active rows (loss weight != 0, target kept, entropy mask on) go
  through row blocks: the logits of a block are computed once into a bounded fp32 workspace with the
  block's statistics, the policy-loss kernel turns (logp, entropy) into (g_logp, g_H), dlogits overwrite
  the logits in place, and two cuBLAS GEMMs give the block's dX and its share of dW. Three
  GEMM-equivalents over the active rows; rows that only need their log-probs get a forward.
* ``recompute``: GSPO (a sequence's ratio needs all of its tokens) and a top-entropy selection (needs every
  entropy): a forward over every row, the selection and coefficients, then the same row-block pass over
  the active rows with the coefficients known.

Rows that get no gradient never enter a GEMM of the backward (token sparsity: with a 20% entropy selection
the backward does a fifth of the work).
"""

from __future__ import annotations

import math
import os

import torch

from ._common import new_empty
from .linear_logprob_entropy import RowBlockPass, _prep, check_targets, forward_rows
from .policy_loss import (
    LOSS_GSPO,
    policy_loss_fwd_bwd,
    policy_token_grads,
    token_coefficients,
    unpack,
)

SCHEDULES = ("auto", "fused", "recompute")


def top_entropy_mask(entropy: torch.Tensor, valid: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """Exactly k = ceil(f * n_valid) valid tokens of highest entropy, ties by lower index (single process)."""
    n_valid = int(valid.sum())
    x = top_fraction * n_valid
    r = round(x)
    # 0.2 * 10 = 2.0000000000000004 must give 2, not 3; a tiny positive fraction still gives 1
    k = min(n_valid, r if (r > 0 and abs(x - r) <= 1e-9 * max(1.0, x)) else math.ceil(x))
    mask = torch.zeros_like(valid)
    if k <= 0:
        return mask
    pos = torch.nonzero(valid).squeeze(1)
    order = torch.sort(-entropy[pos].double(), stable=True).indices
    mask[pos[order[:k]]] = True
    return mask


def choose_schedule(cfg, *, entropy_mask_given: bool, needs_grad: bool, requested: str = "auto") -> str:
    """The schedule a call takes (pure: also what ``rubric-fast bench --plan`` reports)."""
    if requested not in SCHEDULES:
        raise ValueError(f"schedule: got {requested!r}; accepted: {', '.join(SCHEDULES)}")
    fusable = (cfg.loss_code != LOSS_GSPO and (cfg.top_entropy_fraction is None or entropy_mask_given)
               and needs_grad)
    if requested == "fused" and fusable:
        return "fused"
    if requested == "auto":
        return "fused" if fusable else "recompute"
    return "recompute"


def _sel(t, idx):
    return None if t is None else (t if idx is None else t.index_select(0, idx))


def fused_linear_policy_loss_fwd_bwd(hidden, weight, targets, old_logp, advantages, loss_weight, ref_logp,
                                     is_weight, seq_index, entropy_mask, fparams, iparams, bias, temperature: float,
                                     ignore_index: int, needs_dhidden: bool, needs_dweight: bool, needs_dbias: bool,
                                     schedule: str | None = None):
    """-> (loss 0-dim f32, stats f32[4], logp f32[N], entropy f32[N], dhidden | None, dweight | None,
    dbias | None). ``fparams, iparams``: the packed PolicyLossConfig (``cfg.to_op_args()``). ``old_logp=None``:
    on-policy, the old log-probs are this forward's own (ratio 1), with no extra pass. ``schedule``: auto,
    fused or recompute (default: RUBRIC_FAST_FUSED_SCHEDULE, else auto); fused falls back to recompute
    where it cannot apply (GSPO, a top-entropy selection still to make)."""
    cfg = unpack(fparams, iparams)
    hidden_dtype = hidden.dtype
    hidden, weight, targets, bias = _prep(hidden, weight, targets, bias)
    n = hidden.shape[0]
    dev = hidden.device
    check_targets(targets, weight.shape[0], ignore_index)
    needs_dbias = needs_dbias and bias is not None
    needs_grad = needs_dhidden or needs_dweight or needs_dbias
    w = loss_weight.float().contiguous()
    valid = (w != 0) & (targets != ignore_index)
    requested = schedule or os.environ.get("RUBRIC_FAST_FUSED_SCHEDULE", "auto")
    chosen = choose_schedule(cfg, entropy_mask_given=entropy_mask is not None, needs_grad=needs_grad,
                             requested=requested)
    ent_for_loss = cfg.entropy_coef != 0

    if chosen == "fused":
        active = valid if entropy_mask is None else valid & entropy_mask.bool()
        active_idx = torch.nonzero(active).squeeze(1)
        all_active = active_idx.numel() == n
        idx = None if all_active else active_idx
        coef = token_coefficients(w, seq_index, cfg.aggregation_code, cfg.normalizer or 0.0)
        logp = new_empty((n,), torch.float32, dev)
        ent = new_empty((n,), torch.float32, dev)
        lse = new_empty((n,), torch.float32, dev)
        # rows without a gradient still need their log-probs (outputs, and they enter the loss value);
        # ignored rows are all zeros
        rest = torch.nonzero(~active & (targets != ignore_index)).squeeze(1)
        ign = torch.nonzero(targets == ignore_index).squeeze(1)
        if ign.numel():
            for t in (logp, ent, lse):
                t.index_fill_(0, ign, 0.0)
        if rest.numel() > 0:
            lp_i, ent_i, lse_i = forward_rows(hidden.index_select(0, rest), weight, targets.index_select(0, rest),
                                              bias, temperature, ignore_index)
            logp.index_copy_(0, rest, lp_i)
            ent.index_copy_(0, rest, ent_i)
            lse.index_copy_(0, rest, lse_i)
        rows_old, rows_adv, rows_w, rows_coef = (_sel(t, idx) for t in (old_logp, advantages, w, coef))
        rows_ref, rows_isw, rows_em = (_sel(t, idx) for t in (ref_logp, is_weight, entropy_mask))

        def coefficients(r0, r1, lp_b, ent_b, lse_b):
            def blk(t):
                return None if t is None else t[r0:r1]

            gl_b, gh_b, _ = policy_token_grads(
                cfg, lp_b, lp_b if old_logp is None else blk(rows_old), blk(rows_adv), blk(rows_w), blk(rows_coef),
                None, blk(rows_ref), blk(rows_isw), ent_b if ent_for_loss else None, blk(rows_em))
            return gl_b, gh_b

        rb = RowBlockPass(hidden, weight, targets, bias, temperature, ignore_index, idx,
                          needs_dhidden=needs_dhidden, needs_dweight=needs_dweight, needs_dbias=needs_dbias,
                          hidden_dtype=hidden_dtype)
        dhidden, dweight, db32 = rb.run(coefficients=coefficients, out=(logp, ent, lse))
        loss, stats, _, _ = policy_loss_fwd_bwd(
            logp, logp if old_logp is None else old_logp, advantages, w, ref_logp, is_weight, seq_index,
            ent if ent_for_loss else None, entropy_mask, cfg)
        dbias = db32.to(bias.dtype) if needs_dbias else None
        return loss, stats, logp, ent, dhidden, dweight, dbias

    logp, ent, lse = forward_rows(hidden, weight, targets, bias, temperature, ignore_index)
    if old_logp is None:
        old_logp = logp
    if entropy_mask is None and cfg.top_entropy_fraction is not None:
        entropy_mask = top_entropy_mask(ent, valid, cfg.top_entropy_fraction)
    loss, stats, gl, gh = policy_loss_fwd_bwd(
        logp, old_logp, advantages, w, ref_logp, is_weight, seq_index, ent if ent_for_loss else None, entropy_mask,
        cfg)
    dhidden = dweight = dbias = None
    if needs_grad:
        active = (targets != ignore_index) & ((gl != 0) | (gh != 0))
        active_idx = torch.nonzero(active).squeeze(1)
        idx = None if active_idx.numel() == n else active_idx
        rb = RowBlockPass(hidden, weight, targets, bias, temperature, ignore_index, idx,
                          needs_dhidden=needs_dhidden, needs_dweight=needs_dweight, needs_dbias=needs_dbias,
                          hidden_dtype=hidden_dtype)
        mu = lse - ent
        given = tuple(_sel(t, idx).contiguous() for t in (lse, mu, gl, gh))
        dhidden, dweight, db32 = rb.run(given=given)
        dbias = db32.to(bias.dtype) if needs_dbias else None
    return loss, stats, logp, ent, dhidden, dweight, dbias
