"""Reference log-prob / entropy / log-sum-exp straight from hidden states (docs/ops-math.md).

Plain torch, correct in float64, bounded memory: rows and vocabulary are processed in chunks with an
online max / sum-exp / sum(p (z - max)) (Milakov & Gimelshein 2018), so the N x V logits never exist at
once. The target logit comes from the same computed logits as the max and the sum, so logp <= 0 and
entropy >= 0 in every dtype.
The backward recomputes each chunk of logits. This is both the CPU path of the ``torch`` backend and the
oracle the other backends are tested against.
"""

from __future__ import annotations

import torch

DEFAULT_ROW_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 8192


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when every given floating tensor is float64 (oracle mode), else float32."""
    ts = [t for t in tensors if t is not None and t.is_floating_point()]
    return torch.float64 if ts and all(t.dtype == torch.float64 for t in ts) else torch.float32


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """Boolean mask of rows that count; raises on a target outside [0, V) that is not ignore_index."""
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets: expected int64 or int32, got {targets.dtype}")
    active = targets != ignore_index
    if targets.numel() and bool(((targets < 0) | (targets >= vocab))[active].any()):
        bad = targets[active & ((targets < 0) | (targets >= vocab))][:5].tolist()
        raise ValueError(f"targets: values must be in [0, {vocab}) or ignore_index={ignore_index}; got {bad}")
    return active


def _chunk_logits(x, weight, bias, v0, v1, temperature, dtype):
    z = x @ weight[v0:v1].to(dtype).T
    if bias is not None:
        z = z + bias[v0:v1].to(dtype)
    return z / temperature if temperature != 1.0 else z


def forward_stats(hidden, weight, targets, bias, temperature, ignore_index, row_chunk=None, vocab_chunk=None):
    """(logp, entropy, lse) without gradient, in the compute dtype."""
    row_chunk = row_chunk or DEFAULT_ROW_CHUNK  # read at call time so tests can shrink the chunks
    vocab_chunk = vocab_chunk or DEFAULT_VOCAB_CHUNK
    n, v = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden, weight, bias)
    active = check_targets(targets, v, ignore_index)
    logp = torch.zeros(n, dtype=dtype, device=hidden.device)
    ent = torch.zeros_like(logp)
    lse = torch.zeros_like(logp)
    for r0 in range(0, n, row_chunk):
        r1 = min(n, r0 + row_chunk)
        x = hidden[r0:r1].to(dtype)
        tgt = targets[r0:r1].long()
        # Online state per row, all from the same chunk logits z: running max m, s = sum exp(z - m),
        # t = sum exp(z - m) (z - m) <= 0 (relative to m: rescaled as m grows, sum e' (z - m') =
        # r (t + (m - m') s) with r = exp(m - m')), and the target logit zt gathered from z.
        m = s = t = None
        zt = torch.zeros(r1 - r0, dtype=dtype, device=hidden.device)
        for v0 in range(0, v, vocab_chunk):
            v1 = min(v, v0 + vocab_chunk)
            z = _chunk_logits(x, weight, bias, v0, v1, temperature, dtype)
            z_max = z.max(dim=1).values
            if m is None:  # first chunk
                m, s, t = z_max, torch.zeros_like(z_max), torch.zeros_like(z_max)
            m_new = torch.maximum(m, z_max)
            shift = m - m_new
            scale = torch.exp(shift)
            d = z - m_new[:, None]
            e = torch.exp(d)
            t = (t + shift * s) * scale + (e * d).sum(1)
            s = s * scale + e.sum(1)
            m = m_new
            in_chunk = (tgt >= v0) & (tgt < v1)
            idx = (tgt - v0).clamp(0, v1 - v0 - 1)
            zt = torch.where(in_chunk, z.gather(1, idx[:, None]).squeeze(1), zt)
        # logp = (zt - m) - log s and H = log s - t / s: neither subtracts two numbers of the size of the
        # logits (lse - sum p z would, losing ~ulp(|z|) of fp32: 1e-3 at 1e4). s >= 1 and zt <= m make
        # logp <= 0 and H >= 0 by construction; the clamps make the signs unconditional. A true log-prob
        # is <= 0 and a true entropy >= 0, so a clamp cannot change a correct value (in float64 it is a
        # no-op); it only moves a value that rounding pushed past 0. The backward is by hand, so the clamp
        # does not touch the gradients.
        log_s = torch.log(s)
        row_lse = m + log_s
        a = active[r0:r1]
        zero = torch.zeros_like(row_lse)
        lse[r0:r1] = torch.where(a, row_lse, zero)
        logp[r0:r1] = torch.where(a, ((zt - m) - log_s).clamp(max=0.0), zero)
        ent[r0:r1] = torch.where(a, (log_s - t / s).clamp(min=0.0), zero)
    return logp, ent, lse


def backward_grads(hidden, weight, targets, bias, lse, entropy, grad_logp, grad_entropy, temperature,
                   ignore_index, needs=(True, True, True), row_chunk=None, vocab_chunk=None):
    """dX, dW, db from per-row upstream gradients, recomputing the logits chunk by chunk.

    dz = g_logp (onehot - p) - g_H p (z - mu), mu = lse - H; dlogits = dz / T.
    """
    row_chunk = row_chunk or DEFAULT_ROW_CHUNK
    vocab_chunk = vocab_chunk or DEFAULT_VOCAB_CHUNK
    n, v = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden, weight, bias)
    active = targets != ignore_index
    g_lp = torch.zeros(n, dtype=dtype, device=hidden.device) if grad_logp is None else grad_logp.to(dtype)
    g_h = torch.zeros(n, dtype=dtype, device=hidden.device) if grad_entropy is None else grad_entropy.to(dtype)
    g_lp = torch.where(active, g_lp, torch.zeros_like(g_lp))
    g_h = torch.where(active, g_h, torch.zeros_like(g_h))
    need_dx, need_dw, need_db = needs
    dx = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_dx else None
    dw = torch.zeros(weight.shape, dtype=dtype, device=hidden.device) if need_dw else None
    db = torch.zeros(v, dtype=dtype, device=hidden.device) if (need_db and bias is not None) else None
    # Token sparsity: rows with a zero coefficient contribute nothing.
    rows = torch.nonzero((g_lp != 0) | (g_h != 0)).squeeze(1)
    lse = lse.to(dtype)
    mu = lse - entropy.to(dtype)
    for c0 in range(0, rows.numel(), row_chunk):
        idx_rows = rows[c0:c0 + row_chunk]
        x = hidden.index_select(0, idx_rows).to(dtype)
        tgt = targets.index_select(0, idx_rows).long()
        gl, gh = g_lp[idx_rows], g_h[idx_rows]
        l, mu_r = lse[idx_rows], mu[idx_rows]
        dx_rows = torch.zeros_like(x) if need_dx else None
        for v0 in range(0, v, vocab_chunk):
            v1 = min(v, v0 + vocab_chunk)
            z = _chunk_logits(x, weight, bias, v0, v1, temperature, dtype)
            p = torch.exp(z - l[:, None])
            dz = -gl[:, None] * p - gh[:, None] * p * (z - mu_r[:, None])
            in_chunk = (tgt >= v0) & (tgt < v1)
            if bool(in_chunk.any()):
                r = torch.nonzero(in_chunk).squeeze(1)
                dz[r, tgt[r] - v0] += gl[r]
            if temperature != 1.0:
                dz = dz / temperature
            if need_dx:
                dx_rows += dz @ weight[v0:v1].to(dtype)
            if need_dw:
                dw[v0:v1] += dz.T @ x
            if db is not None:
                db[v0:v1] += dz.sum(0)
        if need_dx:
            dx.index_copy_(0, idx_rows, dx_rows)
    return dx, dw, db


class _LinearLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index):
        logp, ent, lse = forward_stats(hidden, weight, targets, bias, temperature, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        return logp, ent, lse

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_lse):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        dx, dw, db = backward_grads(hidden, weight, targets, bias, lse, ent, g_logp, g_ent, ctx.temperature,
                                    ctx.ignore_index, needs=needs)
        cast = lambda g, ref: None if g is None else g.to(ref.dtype)  # noqa: E731
        return cast(dx, hidden), cast(dw, weight), (None if bias is None else cast(db, bias)), None, None, None


def linear_logprob_entropy(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=True,
                           ignore_index=-100):
    """Log-prob of the target, entropy and log-sum-exp of softmax((hidden @ weight.T + bias) / temperature).

    Differentiable w.r.t. hidden, weight and bias through logp and entropy. Returns fp32 tensors (fp64
    when the inputs are fp64). ``entropy`` is None when ``return_entropy`` is False.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N,H] and weight [V,H] must agree: got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets: expected shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    logp, ent, lse = _LinearLogprobEntropy.apply(hidden, weight, bias, targets, float(temperature), int(ignore_index))
    return logp, (ent if return_entropy else None), lse.detach()


def linear_logprob_entropy_materialized(hidden, weight, targets, *, bias=None, temperature=1.0,
                                        ignore_index=-100):
    """The naive form with the full N x V logits: an independent oracle for tests and a benchmark baseline."""
    dtype = compute_dtype(hidden, weight, bias)
    active = check_targets(targets, weight.shape[0], ignore_index)
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    z = z / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    safe = torch.where(active, targets.long(), torch.zeros_like(targets.long()))
    logp = logprobs.gather(1, safe[:, None]).squeeze(1)
    ent = -(logprobs.exp() * logprobs).sum(-1)
    lse = torch.logsumexp(z, dim=-1)
    zero = torch.zeros_like(logp)
    return torch.where(active, logp, zero), torch.where(active, ent, zero), torch.where(active, lse, zero)
