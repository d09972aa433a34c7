"""Log-prob, entropy and log-sum-exp straight from hidden states, without the N x V logits.

Math: docs/ops-math.md, "linear_logprob_entropy". Forward: each program owns a block of rows and a range
of the vocabulary (split-V, so that a small N still fills the GPU); it computes logits tiles with
``tl.dot`` and keeps an online max / sum-exp / sum p (z - m) per row (Milakov & Gimelshein 2018), which
stays exact for logits as large as 1e4 (no lse - mu cancellation). A small combine kernel merges the
splits. Backward recomputes the logits chunk of the vocabulary by chunk over the *active* rows only
(rows with a non-zero upstream gradient), writes dlogits into a bounded workspace, and hands the two
GEMMs (dX += dz W_c, dW_c = dz^T X) to cuBLAS; dW of a vocabulary chunk is reduced over all rows in one
GEMM (fp32 accumulation inside the GEMM), dX is accumulated over chunks in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, new_empty, num_sms, workspace_bytes

NEG_INIT = -1.0e30  # running max start: finite, so that 0 * (m_old - m_new) stays 0


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_xn, stride_wv, inv_temp,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """fp32 (x W^T + b) / T for a BLOCK_N x BLOCK_V tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        hmask = hk < H
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xn + hk[None, :],
                     mask=row_mask[:, None] & hmask[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wv + hk[None, :],
                     mask=col_mask[:, None] & hmask[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.jit
def _fwd_split_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, part_ptr, z_ptr,
                      N, V, H, stride_xn, stride_wv, stride_zn, inv_temp, v_per_split,
                      HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """Partial (m, s, u, z_target) of rows [pid0 * BLOCK_N, ...) over vocabulary range split pid1.

    s = sum exp(z - m), u = sum exp(z - m) (z - m). Optionally stores the fp32 logits (fused loss)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_N,), NEG_INIT, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_xn, stride_wv,
                         inv_temp, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        if STORE_Z:
            tl.store(z_ptr + rows[:, None].to(tl.int64) * stride_zn + cols[None, :], z,
                     mask=row_mask[:, None] & col_mask[None, :])
        zm = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        alpha = tl.exp(m - m_new)
        d = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
        e = tl.where(col_mask[None, :], tl.exp(d), 0.0)
        # u is relative to the running max: shift the old sum by (m - m_new) before rescaling
        u = alpha * (u + s * (m - m_new)) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        zy += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    base = part_ptr + pid_s * N + rows
    stride_q = n_splits * N
    tl.store(base, m, mask=row_mask)
    tl.store(base + stride_q, s, mask=row_mask)
    tl.store(base + 2 * stride_q, u, mask=row_mask)
    tl.store(base + 3 * stride_q, zy, mask=row_mask)


@triton.jit
def _combine_kernel(part_ptr, tgt_ptr, logp_ptr, ent_ptr, lse_ptr, N, n_splits, ignore_index,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    stride_q = n_splits * N
    big_m = tl.full((BLOCK,), NEG_INIT, tl.float32)
    for k in range(n_splits):
        big_m = tl.maximum(big_m, tl.load(part_ptr + k * N + rows, mask=mask, other=NEG_INIT))
    s = tl.zeros((BLOCK,), tl.float32)
    u = tl.zeros((BLOCK,), tl.float32)
    zy = tl.zeros((BLOCK,), tl.float32)
    for k in range(n_splits):
        mk = tl.load(part_ptr + k * N + rows, mask=mask, other=NEG_INIT)
        sk = tl.load(part_ptr + stride_q + k * N + rows, mask=mask, other=0.0)
        uk = tl.load(part_ptr + 2 * stride_q + k * N + rows, mask=mask, other=0.0)
        zk = tl.load(part_ptr + 3 * stride_q + k * N + rows, mask=mask, other=0.0)
        a = tl.exp(mk - big_m)
        u += a * (uk + sk * (mk - big_m))
        s += a * sk
        zy += zk
    s = tl.where(mask, s, 1.0)
    log_s = tl.log(s)
    lse = big_m + log_s
    ent = log_s - u / s
    logp = zy - lse
    tgt = tl.load(tgt_ptr + rows, mask=mask, other=ignore_index)
    ign = tgt == ignore_index
    tl.store(logp_ptr + rows, tl.where(ign, 0.0, logp), mask=mask)
    tl.store(ent_ptr + rows, tl.where(ign, 0.0, ent), mask=mask)
    tl.store(lse_ptr + rows, tl.where(ign, 0.0, lse), mask=mask)


@triton.jit
def _dlogits_recompute_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, mu_ptr, gl_ptr, gh_ptr, dz_ptr, db_ptr,
                              N, H, v_lo, v_hi, stride_xn, stride_wv, stride_dzn, inv_temp,
                              HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                              DOT_PRECISION: tl.constexpr):
    """dz[:, v - v_lo] for v in [v_lo, v_hi): recompute the logits tile, then
    dz = (g_logp (1[v=y] - p) - g_H p (z - mu)) / T.  Rows here are the compacted active rows."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < v_hi
    z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_xn, stride_wv, inv_temp,
                     HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    mu = tl.load(mu_ptr + rows, mask=row_mask, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=row_mask, other=0.0)
    gh = tl.load(gh_ptr + rows, mask=row_mask, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    p = tl.exp(z - lse[:, None])
    onehot = cols[None, :] == tgt[:, None]
    dz = (gl[:, None] * (tl.where(onehot, 1.0, 0.0) - p) - gh[:, None] * p * (z - mu[:, None])) * inv_temp
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    tl.store(dz_ptr + rows[:, None].to(tl.int64) * stride_dzn + (cols - v_lo)[None, :],
             dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
    if HAS_DBIAS:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask)


@triton.jit
def _dlogits_from_z_kernel(z_ptr, dz_ptr, tgt_ptr, lse_ptr, mu_ptr, gl_ptr, gh_ptr, db_ptr,
                           N, V, stride_zn, stride_dzn, inv_temp,
                           HAS_DBIAS: tl.constexpr, IN_PLACE: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """dz from stored fp32 logits (fused loss). Each program walks whole rows left to right, so dz may be
    written in place over the fp32 logits even when it is narrower (bf16 dz of row r at element v lives
    in bytes the program has already read); a barrier per tile orders every warp's loads before the
    stores."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_mask = rows < N
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    mu = tl.load(mu_ptr + rows, mask=row_mask, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=row_mask, other=0.0)
    gh = tl.load(gh_ptr + rows, mask=row_mask, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        m2 = row_mask[:, None] & (cols < V)[None, :]
        z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_zn + cols[None, :], mask=m2, other=0.0)
        p = tl.exp(z - lse[:, None])
        onehot = cols[None, :] == tgt[:, None]
        dz = (gl[:, None] * (tl.where(onehot, 1.0, 0.0) - p) - gh[:, None] * p * (z - mu[:, None])) * inv_temp
        dz = tl.where(m2, dz, 0.0)
        if IN_PLACE:
            tl.debug_barrier()
        tl.store(dz_ptr + rows[:, None].to(tl.int64) * stride_dzn + cols[None, :],
                 dz.to(dz_ptr.dtype.element_ty), mask=m2)
        if HAS_DBIAS:
            tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=cols < V)


@triton.jit
def _mm_accumulate_kernel(a_ptr, b_ptr, c_ptr, M, Nc, K, stride_am, stride_ak, stride_bk, stride_bn,
                          stride_cm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """c (fp32) += a @ b with fp32 accumulation (portable fallback when cuBLAS cannot write fp32)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = (rm < M)[:, None] & (rn < Nc)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    acc = tl.load(c_ptrs, mask=cmask, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :].to(tl.int64) * stride_ak,
                    mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn,
                    mask=(rk < K)[:, None] & (rn < Nc)[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    tl.store(c_ptrs, acc, mask=cmask)


# ----------------------------------------------------------------------------------------------
# host helpers
# ----------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _gemm_cfg():
    if interpreting():
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16), {}
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64), dict(num_warps=8, num_stages=3)


_MM_OUT_DTYPE_OK: bool | None = None  # does torch.mm(..., out_dtype=float32) work on this build/device?
FORCE_TRITON_MM = False  # tests flip this to exercise _mm_accumulate_kernel


def mm_accumulate_f32(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """c (fp32, contiguous rows) += a @ b with fp32 accumulation, whatever the dtype of a and b."""
    global _MM_OUT_DTYPE_OK
    if a.dtype == torch.float32 and b.dtype == torch.float32 and not FORCE_TRITON_MM:
        c.addmm_(a, b)
        return
    if a.is_cuda and not FORCE_TRITON_MM and _MM_OUT_DTYPE_OK is not False:
        try:
            c.add_(torch.mm(a, b, out_dtype=torch.float32))
            _MM_OUT_DTYPE_OK = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE_OK = False
    m, k = a.shape
    n = b.shape[1]
    if interpreting():
        bm, bn, bk, opts = 16, 16, 16, {}
    else:
        bm, bn, bk, opts = 128, 128, 64, dict(num_warps=8, num_stages=3)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _mm_accumulate_kernel[grid](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                c.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                DOT_PRECISION=_dot_precision(a.dtype), **opts)


def _prep(hidden, weight, targets, bias):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets: expected shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    targets = targets.to(torch.int64).contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return hidden, weight, targets, bias


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        v = targets[bad][:5].tolist()
        raise ValueError(f"targets: values must be in [0, {vocab}) or ignore_index={ignore_index}; got {v}")


def _num_splits(n_row_blocks: int, vocab: int, block_v: int, device: torch.device) -> tuple[int, int]:
    """Split the vocabulary so that row blocks x splits fills about two waves of the GPU."""
    n_vtiles = triton.cdiv(vocab, block_v)
    want = max(1, triton.cdiv(2 * num_sms(device), n_row_blocks))
    splits = min(want, n_vtiles)
    v_per_split = triton.cdiv(n_vtiles, splits) * block_v
    return triton.cdiv(vocab, v_per_split), v_per_split


def forward_rows(hidden, weight, targets, bias, temperature, ignore_index, z_out=None):
    """Forward on already prepared tensors; z_out ([N, >=V] fp32 rows) receives the logits when given."""
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    logp = new_empty((n,), torch.float32, dev)
    ent = new_empty((n,), torch.float32, dev)
    lse = new_empty((n,), torch.float32, dev)
    if n == 0:
        return logp, ent, lse
    cfg, opts = _gemm_cfg()
    n_rb = triton.cdiv(n, cfg["BLOCK_N"])
    splits, v_per_split = _num_splits(n_rb, v, cfg["BLOCK_V"], dev)
    part = new_empty((4, splits, n), torch.float32, dev)
    _fwd_split_kernel[(n_rb, splits)](
        hidden, weight, bias if bias is not None else hidden, targets, part,
        z_out if z_out is not None else part,
        n, v, h, hidden.stride(0), weight.stride(0), z_out.stride(0) if z_out is not None else 0,
        1.0 / float(temperature), v_per_split,
        HAS_BIAS=bias is not None, STORE_Z=z_out is not None, DOT_PRECISION=_dot_precision(hidden.dtype),
        **cfg, **opts)
    blk = 128
    _combine_kernel[(triton.cdiv(n, blk),)](part, targets, logp, ent, lse, n, splits, ignore_index, BLOCK=blk)
    return logp, ent, lse


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def linear_logprob_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               bias: torch.Tensor | None, temperature: float, ignore_index: int):
    """-> (logp f32[N], entropy f32[N], lse f32[N]); ignored rows give 0, 0, 0."""
    hidden, weight, targets, bias = _prep(hidden, weight, targets, bias)
    check_targets(targets, weight.shape[0], ignore_index)
    return forward_rows(hidden, weight, targets, bias, temperature, ignore_index)


def _vocab_chunk(n_rows: int, vocab: int, elem: int, block_v: int) -> int:
    c = workspace_bytes() // max(1, n_rows * elem)
    c = max(block_v, (c // block_v) * block_v)
    return min(c, triton.cdiv(vocab, block_v) * block_v)


def backward_active_rows(x, weight, tgt, bias, lse, mu, gl, gh, temperature, needs_dx, needs_dw, needs_db,
                         dw_out=None, db32=None):
    """Gradients for compacted active rows (recompute). Returns dx32 [n, H] fp32 or None; writes dW rows
    into dw_out ([V, H], weight dtype, rows of each vocabulary chunk written once) and db into db32."""
    n, h = x.shape
    v = weight.shape[0]
    dev = x.device
    cfg, opts = _gemm_cfg()
    dz_dtype = weight.dtype
    dx32 = torch.zeros((n, h), dtype=torch.float32, device=dev) if needs_dx else None
    chunk = _vocab_chunk(n, v, torch.tensor([], dtype=dz_dtype).element_size(), cfg["BLOCK_V"])
    dz = new_empty((n, min(chunk, v)), dz_dtype, dev)
    inv_t = 1.0 / float(temperature)
    for v0 in range(0, v, chunk):
        v1 = min(v, v0 + chunk)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(v1 - v0, cfg["BLOCK_V"]))
        dzc = dz[:, : v1 - v0]
        _dlogits_recompute_kernel[grid](
            x, weight, bias if bias is not None else x, tgt, lse, mu, gl, gh, dzc,
            db32 if db32 is not None else lse,
            n, h, v0, v1, x.stride(0), weight.stride(0), dz.stride(0), inv_t,
            HAS_BIAS=bias is not None, HAS_DBIAS=needs_db, DOT_PRECISION=_dot_precision(x.dtype), **cfg, **opts)
        if needs_dw:
            # one GEMM over every active row: fp32 accumulation inside, one rounding to the weight dtype
            torch.mm(dzc.t(), x, out=dw_out[v0:v1])
        if needs_dx:
            mm_accumulate_f32(dx32, dzc, weight[v0:v1])
    return dx32


def linear_logprob_entropy_bwd(hidden, weight, targets, bias, lse, entropy, grad_logp, grad_entropy,
                               temperature: float, ignore_index: int, needs_dhidden: bool, needs_dweight: bool,
                               needs_dbias: bool):
    """-> (dhidden | None, dweight | None, dbias | None). Recomputes the logits of the active rows only."""
    hidden_dtype = hidden.dtype
    hidden, weight, targets, bias = _prep(hidden, weight, targets, bias)
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    needs_dbias = needs_dbias and bias is not None
    gl = grad_logp.float() if grad_logp is not None else torch.zeros(n, dtype=torch.float32, device=dev)
    gh = grad_entropy.float() if grad_entropy is not None else torch.zeros(n, dtype=torch.float32, device=dev)
    active = (targets != ignore_index) & ((gl != 0) | (gh != 0))
    idx = torch.nonzero(active).squeeze(1)
    dhidden = torch.zeros((n, h), dtype=hidden_dtype, device=dev) if needs_dhidden else None
    dweight = torch.zeros((v, h), dtype=weight.dtype, device=dev) if needs_dweight else None
    db32 = torch.zeros((v,), dtype=torch.float32, device=dev) if needs_dbias else None
    if idx.numel() > 0 and (needs_dhidden or needs_dweight or needs_dbias):
        all_rows = idx.numel() == n
        x = hidden if all_rows else hidden.index_select(0, idx)
        tg = targets if all_rows else targets.index_select(0, idx)
        lse_a = lse.float() if all_rows else lse.float().index_select(0, idx)
        mu = (lse.float() - entropy.float())
        mu = mu if all_rows else mu.index_select(0, idx)
        gla = gl if all_rows else gl.index_select(0, idx)
        gha = gh if all_rows else gh.index_select(0, idx)
        dx32 = backward_active_rows(x.contiguous(), weight, tg.contiguous(), bias, lse_a.contiguous(),
                                    mu.contiguous(), gla.contiguous(), gha.contiguous(), temperature,
                                    needs_dhidden, needs_dweight, needs_dbias, dw_out=dweight, db32=db32)
        if needs_dhidden:
            if all_rows:
                dhidden.copy_(dx32)
            else:
                dhidden.index_copy_(0, idx, dx32.to(hidden_dtype))
    dbias = db32.to(bias.dtype) if needs_dbias else None
    return dhidden, dweight, dbias
