"""linear -> log-prob / entropy -> (entropy selection) -> policy loss, forward and backward in one call.

Two schedules (docs/ops-math.md):

* one pass, when each token's gradient coefficient is known as soon as its own row's log-prob is known
  (loss ppo_clip / cispo / sapo with aggregation token_mean / constant, and no top-entropy selection left
  to do): the active rows (loss weight != 0, target kept, entropy mask on) are processed in blocks of R
  rows. For a block the forward kernel writes the fp32 logits into a bounded workspace while it reduces
  lse / entropy, the policy-loss kernel turns (logp, entropy) into (g_logp, g_H), a memory-bound kernel
  turns the stored logits into dlogits in place, and two GEMMs give dX of the block and its share of dW.
  The logits are computed once: 3 GEMMs in all, instead of 4 for forward + recompute.
* forward then recompute backward (GSPO and the seq_mean_* aggregations need every token's log-prob
  first; so does a top-entropy selection): forward over all rows, selection, coefficients, then the
  recompute backward of linear_logprob_entropy over the active rows only.

Rows that get no gradient never enter a GEMM of the backward (token sparsity: with a 20% entropy
selection the backward does a fifth of the work).
"""

from __future__ import annotations

import math
import os

import torch
import triton

from ._common import interpreting, new_empty, workspace_bytes
from .linear_logprob_entropy import (
    _dlogits_from_z_kernel,
    _prep,
    check_targets,
    forward_rows,
    linear_logprob_entropy_bwd,
    mm_accumulate_f32,
)
from .policy_loss import (
    AGG_CONSTANT,
    AGG_TOKEN_MEAN,
    LOSS_GSPO,
    policy_loss_fwd_bwd,
    policy_token_grads,
    token_coefficients,
)


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


def _row_block(n_active: int, vocab: int) -> int:
    """Rows per one-pass block: the fp32 logits of a block fill at most the workspace budget."""
    r = max(16, workspace_bytes() // (vocab * 4))
    r = (r // 16) * 16 if r >= 128 else max(16, r)
    return min(r, max(1, n_active))


def _one_pass(hidden, weight, targets, bias, temperature, ignore_index, active_idx, coef, pl_args,
              needs_dhidden, needs_dweight, needs_dbias, logp, ent, lse, hidden_dtype):
    """Process the active rows in blocks; fills logp / ent / lse of those rows, returns the grads."""
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    (old_logp, advantages, w, ref_logp, is_weight, entropy_mask, loss_type, eps_low, eps_high, delta,
     dual_clip, beta, kl_type, entropy_coef, tau_pos, tau_neg) = pl_args
    n_act = active_idx.numel()
    dhidden = torch.zeros((n, h), dtype=hidden_dtype, device=dev) if needs_dhidden else None
    dweight = torch.zeros((v, h), dtype=weight.dtype, device=dev) if needs_dweight else None
    db32 = torch.zeros((v,), dtype=torch.float32, device=dev) if needs_dbias else None
    if n_act == 0:
        return dhidden, dweight, db32
    r = _row_block(n_act, v)
    n_blocks = triton.cdiv(n_act, r)
    # dW: a single block is one GEMM (fp32 accumulation inside, one rounding); several blocks accumulate
    # in an fp32 buffer (the weight's own dtype when that is fp32)
    dw32 = None
    if needs_dweight and n_blocks > 1:
        dw32 = dweight if weight.dtype == torch.float32 else torch.zeros((v, h), dtype=torch.float32, device=dev)
    z_ws = new_empty((r, v), torch.float32, dev)
    dz_dtype = weight.dtype
    elem = torch.tensor([], dtype=dz_dtype).element_size()
    # dlogits overwrite the fp32 logits in place: row stride stays 4 V bytes
    dz_full = z_ws.view(dz_dtype) if elem != 4 else z_ws
    inv_t = 1.0 / float(temperature)
    rows_per_prog, block_v = (2, 64) if interpreting() else (4, 1024)

    def sel(t, i):
        return t.index_select(0, i) if t is not None else None

    for r0 in range(0, n_act, r):
        idx = active_idx[r0:r0 + r]
        rb = idx.numel()
        xb = hidden.index_select(0, idx)
        tb = targets.index_select(0, idx)
        zb = z_ws[:rb]
        lp_b, ent_b, lse_b = forward_rows(xb, weight, tb, bias, temperature, ignore_index, z_out=zb)
        gl_b, gh_b, _ = policy_token_grads(
            lp_b, lp_b if old_logp is None else sel(old_logp, idx), sel(advantages, idx), sel(w, idx), sel(coef, idx), None,
            sel(ref_logp, idx), sel(is_weight, idx), ent_b if entropy_coef != 0 else None, sel(entropy_mask, idx),
            loss_type, eps_low, eps_high, delta, dual_clip, beta, kl_type, entropy_coef, tau_pos, tau_neg)
        mu_b = lse_b - ent_b
        dzb = dz_full[:rb, :v]
        _dlogits_from_z_kernel[(triton.cdiv(rb, rows_per_prog),)](
            zb, dzb, tb, lse_b, mu_b, gl_b, gh_b, db32 if db32 is not None else lse_b,
            rb, v, zb.stride(0), dzb.stride(0), inv_t,
            HAS_DBIAS=needs_dbias, IN_PLACE=elem != 4, ROWS=rows_per_prog, BLOCK_V=block_v)
        if needs_dhidden:
            dhidden.index_copy_(0, idx, torch.mm(dzb, weight).to(hidden_dtype))
        if needs_dweight:
            if dw32 is None:
                torch.mm(dzb.t(), xb, out=dweight)
            else:
                mm_accumulate_f32(dw32, dzb.t(), xb)
        logp.index_copy_(0, idx, lp_b)
        ent.index_copy_(0, idx, ent_b)
        lse.index_copy_(0, idx, lse_b)
    if dw32 is not None and dw32 is not dweight:
        dweight.copy_(dw32)
    return dhidden, dweight, db32


def fused_linear_policy_loss_fwd_bwd(hidden, weight, targets, old_logp, advantages, loss_weight, ref_logp,
                                     is_weight, seq_index, entropy_mask, loss_type: int, eps_low: float,
                                     eps_high: float, delta: float, dual_clip: float, beta: float, kl_type: int,
                                     entropy_coef: float, aggregation: int, normalizer: float,
                                     sapo_tau_pos: float, sapo_tau_neg: float, top_entropy_fraction: float,
                                     bias, temperature: float, ignore_index: int, needs_dhidden: bool,
                                     needs_dweight: bool, needs_dbias: bool):
    """-> (loss 0-dim f32, stats f32[4], logp f32[N], entropy f32[N], dhidden | None, dweight | None,
    dbias | None). delta, dual_clip, normalizer, top_entropy_fraction <= 0 mean unset. ``old_logp=None``:
    on-policy, the old log-probs are this forward's own (ratio 1), with no extra pass."""
    delta, dual_clip, normalizer = float(delta or 0.0), float(dual_clip or 0.0), float(normalizer or 0.0)
    top_entropy_fraction = float(top_entropy_fraction or 0.0)
    hidden_dtype = hidden.dtype
    hidden, weight, targets, bias = _prep(hidden, weight, targets, bias)
    n = hidden.shape[0]
    dev = hidden.device
    check_targets(targets, weight.shape[0], ignore_index)
    needs_dbias = needs_dbias and bias is not None
    w = loss_weight.float().contiguous()
    valid = (w != 0) & (targets != ignore_index)
    one_pass = (loss_type != LOSS_GSPO and aggregation in (AGG_TOKEN_MEAN, AGG_CONSTANT)
                and (top_entropy_fraction <= 0 or entropy_mask is not None)
                and (needs_dhidden or needs_dweight or needs_dbias))
    pl_common = (loss_type, eps_low, eps_high, delta, dual_clip, beta, kl_type, entropy_coef)
    schedule = os.environ.get("RUBRIC_FAST_FUSED_SCHEDULE", "auto")
    if schedule not in ("auto", "one_pass", "two_pass"):
        raise ValueError(f"RUBRIC_FAST_FUSED_SCHEDULE: got {schedule!r}; accepted: auto, one_pass, two_pass")
    if schedule == "two_pass":
        one_pass = False
    if one_pass:
        active = valid if entropy_mask is None else valid & entropy_mask.bool()
        active_idx = torch.nonzero(active).squeeze(1)
        # auto: one pass when the active rows fit one workspace block (dW is then one GEMM, exact fp32
        # accumulation, no fp32 dW buffer); several blocks would read-modify-write an fp32 dW per block,
        # which costs more than recomputing the logits at LLM vocabulary sizes, so auto recomputes
        n_act = active_idx.numel()
        one_pass = schedule == "one_pass" or n_act <= _row_block(max(n_act, 1), weight.shape[0])
    if one_pass:
        coef = token_coefficients(w, seq_index, aggregation, normalizer)
        inactive_idx = torch.nonzero(~active).squeeze(1)
        logp = new_empty((n,), torch.float32, dev)
        ent = new_empty((n,), torch.float32, dev)
        lse = new_empty((n,), torch.float32, dev)
        if inactive_idx.numel() > 0:  # forward only (their log-probs are outputs and enter the loss value)
            lp_i, ent_i, lse_i = forward_rows(hidden.index_select(0, inactive_idx), weight,
                                              targets.index_select(0, inactive_idx), bias, temperature,
                                              ignore_index)
            logp.index_copy_(0, inactive_idx, lp_i)
            ent.index_copy_(0, inactive_idx, ent_i)
            lse.index_copy_(0, inactive_idx, lse_i)
        pl_args = (old_logp, advantages, w, ref_logp, is_weight, entropy_mask, *pl_common,
                   sapo_tau_pos, sapo_tau_neg)
        dhidden, dweight, db32 = _one_pass(hidden, weight, targets, bias, temperature, ignore_index, active_idx,
                                           coef, pl_args, needs_dhidden, needs_dweight, needs_dbias,
                                           logp, ent, lse, hidden_dtype)
        loss, stats, _, _ = policy_loss_fwd_bwd(
            logp, logp if old_logp is None else old_logp, advantages, w, ref_logp, is_weight, seq_index, ent if entropy_coef != 0 else None,
            entropy_mask, loss_type, eps_low, eps_high, delta, dual_clip, beta, kl_type, entropy_coef,
            aggregation, normalizer, sapo_tau_pos, sapo_tau_neg)
        dbias = db32.to(bias.dtype) if needs_dbias else None
        return loss, stats, logp, ent, dhidden, dweight, dbias

    logp, ent, lse = forward_rows(hidden, weight, targets, bias, temperature, ignore_index)
    if old_logp is None:
        old_logp = logp
    if entropy_mask is None and top_entropy_fraction > 0:
        entropy_mask = top_entropy_mask(ent, valid, top_entropy_fraction)
    loss, stats, gl, gh = policy_loss_fwd_bwd(
        logp, old_logp, advantages, w, ref_logp, is_weight, seq_index, ent if entropy_coef != 0 else None,
        entropy_mask, loss_type, eps_low, eps_high, delta, dual_clip, beta, kl_type, entropy_coef, aggregation,
        normalizer, sapo_tau_pos, sapo_tau_neg)
    dhidden = dweight = dbias = None
    if needs_dhidden or needs_dweight or needs_dbias:
        dhidden, dweight, dbias = linear_logprob_entropy_bwd(
            hidden, weight, targets, bias, lse, ent, gl, gh, temperature, ignore_index,
            needs_dhidden, needs_dweight, needs_dbias)
        if dhidden is not None and dhidden.dtype != hidden_dtype:
            dhidden = dhidden.to(hidden_dtype)
    return loss, stats, logp, ent, dhidden, dweight, dbias
