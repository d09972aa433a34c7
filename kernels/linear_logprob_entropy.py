"""Log-prob, entropy and log-sum-exp straight from hidden states, without the N x V logits.

Math: docs/ops-math.md, "linear_logprob_entropy"; what runs: kernels/plan.py. Forward: one program per
BLOCK_N x BLOCK_V logits tile (``tl.dot``, wgmma on Hopper), in grouped order so that a wave of programs
shares its operands through L2; each tile reduces its own (max, sum-exp, sum p (z - m), target logit) per
row (Milakov & Gimelshein 2018: exact for logits as large as 1e4, no lse - mu cancellation) and a combine
kernel merges the tiles. Gradients: ``RowBlockPass`` stores a row block's fp32 logits once (the same tile
kernel), turns them into dlogits in place, and hands dX = dz W (complete per block) and dW += dz^T X to
cuBLAS: three GEMM-equivalents over the rows that get a gradient.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from . import autotune, plan
from ._common import f32, new_empty
from .plan import KernelLaunch

# running max start: finite, so that 0 * (m_old - m_new) stays 0 (a tl.constexpr: plain globals cannot be
# read inside a @triton.jit function when compiled for a GPU)
NEG_INIT = tl.constexpr(-1.0e30)
_THIS = sys.modules[__name__]


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tile_coords(pid, N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    """Grouped order: GROUP_N row blocks sweep the vocabulary together, so that the programs of one wave
    share W tiles and X rows through L2 instead of re-reading X from HBM for every vocabulary tile."""
    n_rb = tl.cdiv(N, BLOCK_N)
    n_vt = tl.cdiv(V, BLOCK_V)
    width = GROUP_N * n_vt
    first = (pid // width) * GROUP_N
    gsize = tl.minimum(n_rb - first, GROUP_N)
    pid_n = first + (pid % width) % gsize
    pid_v = (pid % width) // gsize
    return pid_n, pid_v


@triton.jit
def _fwd_tile_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, part_ptr, z_ptr,
                     N, V, H, stride_xn, stride_wv, stride_zn, inv_temp,
                     HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, STATS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """One BLOCK_N x BLOCK_V tile of z = (x W^T + b) / T: optionally stores it (fp32), and writes the tile's
    partial (m, s, u, z_target) per row: m = max z, s = sum exp(z - m), u = sum exp(z - m) (z - m)."""
    pid_n, pid_v = _tile_coords(tl.program_id(0), N, V, BLOCK_N, BLOCK_V, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    hk = tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xn + hk[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wv + hk[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hmask = (h0 + hk) < H
        xt = tl.load(x_ptrs, mask=row_mask[:, None] & hmask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=hmask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_temp
    if STORE_Z:
        tl.store(z_ptr + rows[:, None].to(tl.int64) * stride_zn + cols[None, :], z,
                 mask=row_mask[:, None] & col_mask[None, :])
    if STATS:
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
        m = tl.max(tl.where(col_mask[None, :], z, float("-inf")), axis=1)
        d = tl.where(col_mask[None, :], z - m[:, None], 0.0)
        e = tl.where(col_mask[None, :], tl.exp(d), 0.0)
        s = tl.sum(e, axis=1)
        u = tl.sum(e * d, axis=1)
        zy = tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        n_vt = tl.cdiv(V, BLOCK_V)
        base = part_ptr + tl.cast(pid_v, tl.int64) * N + rows
        stride_q = tl.cast(n_vt, tl.int64) * N
        tl.store(base, m, mask=row_mask)
        tl.store(base + stride_q, s, mask=row_mask)
        tl.store(base + 2 * stride_q, u, mask=row_mask)
        tl.store(base + 3 * stride_q, zy, mask=row_mask)


@triton.jit
def _combine_kernel(part_ptr, tgt_ptr, logp_ptr, ent_ptr, lse_ptr, N, n_tiles, ignore_index, BLOCK: tl.constexpr):
    """Merges the per-tile partials of each row (online: one read) into logp, entropy and lse.

    logp = z_y - lse is clamped to <= 0 and the entropy to >= 0: both hold exactly, and only rounding (the
    target logit and the sum-exp come from different reductions) could cross them."""
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    stride_q = tl.cast(n_tiles, tl.int64) * N
    big_m = tl.full((BLOCK,), NEG_INIT, tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    u = tl.zeros((BLOCK,), tl.float32)
    zy = tl.zeros((BLOCK,), tl.float32)
    for k in range(n_tiles):
        off = tl.cast(k, tl.int64) * N + rows
        mk = tl.load(part_ptr + off, mask=mask, other=NEG_INIT)
        sk = tl.load(part_ptr + stride_q + off, mask=mask, other=0.0)
        uk = tl.load(part_ptr + 2 * stride_q + off, mask=mask, other=0.0)
        zy += tl.load(part_ptr + 3 * stride_q + off, mask=mask, other=0.0)
        m_new = tl.maximum(big_m, mk)
        a_old = tl.exp(big_m - m_new)
        a_k = tl.exp(mk - m_new)
        # u is relative to the running max: shift each sum by its max's offset before rescaling
        u = a_old * (u + s * (big_m - m_new)) + a_k * (uk + sk * (mk - m_new))
        s = a_old * s + a_k * sk
        big_m = m_new
    s = tl.where(mask, s, 1.0)
    log_s = tl.log(s)
    lse = big_m + log_s
    ent = tl.maximum(log_s - u / s, 0.0)
    logp = tl.minimum((zy - big_m) - log_s, 0.0)  # relative to the max: no cancellation of two 1e4-sized values
    tgt = tl.load(tgt_ptr + rows, mask=mask, other=ignore_index)
    ign = tgt == ignore_index
    tl.store(logp_ptr + rows, tl.where(ign, 0.0, logp), mask=mask)
    tl.store(ent_ptr + rows, tl.where(ign, 0.0, ent), mask=mask)
    tl.store(lse_ptr + rows, tl.where(ign, 0.0, lse), mask=mask)


@triton.jit
def _dlogits_kernel(z_ptr, dz_ptr, tgt_ptr, lse_ptr, mu_ptr, gl_ptr, gh_ptr, db_ptr,
                    N, V, stride_zn, stride_dzn, inv_temp,
                    HAS_DBIAS: tl.constexpr, IN_PLACE: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """dz = (g_logp (1[v=y] - p) - g_H p (z - mu)) / T from stored fp32 logits, p = exp(z - lse).

    Each program walks whole rows left to right, so dz may be written in place over the fp32 logits even
    when it is narrower (the bf16 dz of row r at element v lives in bytes the program has already read);
    a barrier per tile orders every warp's loads before the stores."""
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
                          GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """c (fp32) += a @ b with fp32 accumulation (dW accumulated in fp32 over row blocks, when cuBLAS cannot
    write fp32 from 16-bit inputs)."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, Nc, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = (rm < M)[:, None] & (rn < Nc)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :].to(tl.int64) * stride_ak,
                    mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn,
                    mask=(rk < K)[:, None] & (rn < Nc)[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    acc += tl.load(c_ptrs, mask=cmask, other=0.0)
    tl.store(c_ptrs, acc, mask=cmask)


# ----------------------------------------------------------------------------------------------
# host helpers
# ----------------------------------------------------------------------------------------------
_ADDMM_F32_OK: bool | None = None  # does torch.addmm(..., out_dtype=float32) work on this build/device?
FORCE_TRITON_MM = False  # tests flip this to exercise _mm_accumulate_kernel


def _launch(spec: KernelLaunch, *args):
    getattr(_THIS, spec.kernel)[spec.grid](*args, **spec.constexprs, num_warps=spec.num_warps,
                                           num_stages=spec.num_stages)


def mm_accumulate_f32(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """c (fp32, contiguous rows) += a @ b with fp32 accumulation and no c-sized temporary."""
    global _ADDMM_F32_OK
    if a.dtype == torch.float32 and b.dtype == torch.float32 and not FORCE_TRITON_MM:
        c.addmm_(a, b)
        return
    if a.is_cuda and not FORCE_TRITON_MM and _ADDMM_F32_OK is not False:
        try:
            torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
            _ADDMM_F32_OK = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_F32_OK = False
    m, k = a.shape
    n = b.shape[1]
    spec = plan.mm_accumulate_launch(m, n, plan.device_arch(a.device), a.dtype)
    _launch(spec, a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0))


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


def _maybe_autotune(hidden, weight, bias):
    """RUBRIC_FAST_AUTOTUNE=1 on a GPU: time the tile candidates once for this (dtype, arch, H, V)."""
    if not (hidden.is_cuda and autotune.enabled()):
        return
    n, h = hidden.shape
    v = weight.shape[0]
    arch = plan.device_arch(hidden.device)
    if plan.tune_key(weight.dtype, arch, h, v) in plan._TUNED:
        return
    rows = hidden[: min(n, 4096)]
    tgt = torch.zeros(rows.shape[0], dtype=torch.int64, device=hidden.device)

    def measure(tile):
        spec = plan.KernelLaunch("_fwd_tile_kernel", "linear_logprob_entropy",
                                 dict(HAS_BIAS=bias is not None, STORE_Z=False, STATS=True,
                                      DOT_PRECISION=plan.dot_precision(weight.dtype), **tile.constexprs()),
                                 tile.num_warps, tile.num_stages, plan.forward_grid(rows.shape[0], v, tile), gemm=True)
        part = torch.empty((4, plan.cdiv(v, tile.BLOCK_V), rows.shape[0]), dtype=torch.float32, device=rows.device)
        args = (rows, weight, bias if bias is not None else rows, tgt, part, part, rows.shape[0], v, h,
                rows.stride(0), weight.stride(0), 0, 1.0)
        _launch(spec, *args)  # compile and warm up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            _launch(spec, *args)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 3

    autotune.ensure_tuned(weight.dtype, arch, h, v, measure)


def forward_rows(hidden, weight, targets, bias, temperature, ignore_index, z_out=None, out=None):
    """Forward on prepared tensors -> (logp, entropy, lse) fp32. ``z_out`` ([N, >=V] fp32 rows) receives the
    scaled logits when given; ``out`` = three fp32 [N] tensors to write into (else fresh ones)."""
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    _maybe_autotune(hidden, weight, bias)
    logp, ent, lse = out if out is not None else (new_empty((n,), torch.float32, dev) for _ in range(3))
    if n == 0:
        return logp, ent, lse
    arch = plan.device_arch(dev)
    tile_spec, comb_spec = plan.forward_launches(n, h, v, weight.dtype, arch, has_bias=bias is not None,
                                                 store_z=z_out is not None)
    n_vt = plan.cdiv(v, tile_spec.constexprs["BLOCK_V"])
    part = new_empty((4, n_vt, n), torch.float32, dev)
    _launch(tile_spec, hidden, weight, bias if bias is not None else hidden, targets, part,
            z_out if z_out is not None else part, n, v, h, hidden.stride(0), weight.stride(0),
            z_out.stride(0) if z_out is not None else 0, f32(1.0 / float(temperature)))
    _launch(comb_spec, part, targets, logp, ent, lse, n, n_vt, ignore_index)
    return logp, ent, lse


# ----------------------------------------------------------------------------------------------
# the row-block pass: logits stored once per block, dlogits in place, dX and dW by two GEMMs
# ----------------------------------------------------------------------------------------------
class RowBlockPass:
    """Gradients of the rows ``idx`` (None: all rows, in order) in row blocks (kernels/plan.py).

    ``coefficients(r0, r1, logp, ent, lse) -> (g_logp, g_H)`` gives the block's per-row coefficients once its
    statistics are known (fused schedule), or ``given=(lse, mu, g_logp, g_H)`` (rows aligned with ``idx``)
    when they were computed before (recompute schedule, the backward of linear_logprob_entropy)."""

    def __init__(self, hidden, weight, targets, bias, temperature, ignore_index, idx, *, needs_dhidden,
                 needs_dweight, needs_dbias, hidden_dtype, fixed_bytes=0):
        self.x, self.w, self.t, self.b = hidden, weight, targets, bias
        self.temperature, self.ignore_index, self.idx = temperature, ignore_index, idx
        self.needs = (needs_dhidden, needs_dweight, needs_dbias and bias is not None)
        n, h = hidden.shape
        v = weight.shape[0]
        dev = hidden.device
        self.n_rows = n if idx is None else idx.numel()
        es = weight.element_size()
        fixed = fixed_bytes + (n * h * es if needs_dhidden else 0) + (v * h * es if needs_dweight else 0)
        _maybe_autotune(hidden, weight, bias)
        self.tile = plan.tile_config(weight.dtype, plan.device_arch(dev), h=h, v=v)
        self.blocks = plan.plan_blocks(self.n_rows, h, v, dtype=weight.dtype, tile=self.tile,
                                       needs_dweight=needs_dweight, fixed_bytes=fixed)
        self.dhidden = torch.zeros((n, h), dtype=hidden_dtype, device=dev) if needs_dhidden else None
        self.dweight = (new_empty((v, h), weight.dtype, dev) if needs_dweight and self.n_rows > 0
                        else (torch.zeros((v, h), dtype=weight.dtype, device=dev) if needs_dweight else None))
        self.dw32 = (torch.zeros((v, h), dtype=torch.float32, device=dev)
                     if needs_dweight and self.blocks.dw_accum == "fp32" else None)
        self.db32 = torch.zeros((v,), dtype=torch.float32, device=dev) if self.needs[2] else None

    def run(self, coefficients=None, given=None, out=None):
        x, w, t, b = self.x, self.w, self.t, self.b
        v = w.shape[0]
        dev = x.device
        r = self.blocks.rows_per_block
        if self.n_rows == 0:
            return self.dhidden, self.dweight, self.db32
        z_ws = new_empty((min(r, self.n_rows), v), torch.float32, dev)
        es = w.element_size()
        dz_full = z_ws.view(w.dtype) if es != 4 else z_ws  # dlogits overwrite the logits: row stride 4 V bytes
        inv_t = f32(1.0 / float(self.temperature))
        first_dw = True
        for r0 in range(0, self.n_rows, r):
            r1 = min(self.n_rows, r0 + r)
            rb = r1 - r0
            ib = None if self.idx is None else self.idx[r0:r1]
            xb = x[r0:r1] if ib is None else x.index_select(0, ib)
            tb = t[r0:r1] if ib is None else t.index_select(0, ib)
            zb = z_ws[:rb]
            if given is None:
                lp_b, ent_b, lse_b = forward_rows(xb, w, tb, b, self.temperature, self.ignore_index, z_out=zb)
                gl_b, gh_b = coefficients(r0, r1, lp_b, ent_b, lse_b)
                mu_b = lse_b - ent_b
                if out is not None:
                    for dst, src in zip(out, (lp_b, ent_b, lse_b)):
                        if ib is None:
                            dst[r0:r1] = src
                        else:
                            dst.index_copy_(0, ib, src)
            else:
                lse_a, mu_a, gl_a, gh_a = given
                tile_only = plan.forward_launches(rb, xb.shape[1], v, w.dtype, plan.device_arch(dev),
                                                  has_bias=b is not None, store_z=True, stats=False)[0]
                _launch(tile_only, xb, w, b if b is not None else xb, tb, zb, zb, rb, v, xb.shape[1], xb.stride(0),
                        w.stride(0), zb.stride(0), inv_t)
                lse_b, mu_b, gl_b, gh_b = (a[r0:r1] for a in (lse_a, mu_a, gl_a, gh_a))
            dzb = dz_full[:rb, :v]
            spec = plan.dlogits_launch(rb, in_place=es != 4, has_dbias=self.needs[2])
            _launch(spec, zb, dzb, tb, lse_b, mu_b, gl_b, gh_b, self.db32 if self.db32 is not None else lse_b,
                    rb, v, zb.stride(0), dzb.stride(0), inv_t)
            if self.needs[0]:
                if ib is None and self.dhidden.dtype == w.dtype:
                    torch.mm(dzb, w, out=self.dhidden[r0:r1])
                else:
                    dxb = torch.mm(dzb, w).to(self.dhidden.dtype)
                    if ib is None:
                        self.dhidden[r0:r1] = dxb
                    else:
                        self.dhidden.index_copy_(0, ib, dxb)
            if self.needs[1]:
                if self.dw32 is not None:
                    mm_accumulate_f32(self.dw32, dzb.t(), xb)
                elif first_dw:
                    torch.mm(dzb.t(), xb, out=self.dweight)  # fp32 accumulation inside, one rounding
                else:
                    self.dweight.addmm_(dzb.t(), xb)
                first_dw = False
        if self.dw32 is not None:
            self.dweight.copy_(self.dw32)
            self.dw32 = None
        return self.dhidden, self.dweight, self.db32


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def linear_logprob_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               bias: torch.Tensor | None, temperature: float, ignore_index: int):
    """-> (logp f32[N], entropy f32[N], lse f32[N]); ignored rows give 0, 0, 0."""
    hidden, weight, targets, bias = _prep(hidden, weight, targets, bias)
    check_targets(targets, weight.shape[0], ignore_index)
    return forward_rows(hidden, weight, targets, bias, temperature, ignore_index)


def linear_logprob_entropy_bwd(hidden, weight, targets, bias, lse, entropy, grad_logp, grad_entropy,
                               temperature: float, ignore_index: int, needs_dhidden: bool, needs_dweight: bool,
                               needs_dbias: bool):
    """-> (dhidden | None, dweight | None, dbias | None). Recomputes the logits of the active rows only
    (rows with a non-zero upstream gradient), in row blocks: three GEMM-equivalents over those rows (two
    for a frozen head)."""
    hidden_dtype = hidden.dtype
    hidden, weight, targets, bias = _prep(hidden, weight, targets, bias)
    n = hidden.shape[0]
    dev = hidden.device
    gl = grad_logp.float() if grad_logp is not None else torch.zeros(n, dtype=torch.float32, device=dev)
    gh = grad_entropy.float() if grad_entropy is not None else torch.zeros(n, dtype=torch.float32, device=dev)
    active = (targets != ignore_index) & ((gl != 0) | (gh != 0))
    idx = torch.nonzero(active).squeeze(1)
    all_rows = idx.numel() == n
    rb = RowBlockPass(hidden, weight, targets, bias, temperature, ignore_index, None if all_rows else idx,
                      needs_dhidden=needs_dhidden, needs_dweight=needs_dweight, needs_dbias=needs_dbias,
                      hidden_dtype=hidden_dtype)
    if not (needs_dhidden or needs_dweight or (needs_dbias and bias is not None)):
        return None, None, None

    def sel(a):
        a = a.float()
        return (a if all_rows else a.index_select(0, idx)).contiguous()

    lse32 = lse.float()
    mu = lse32 - entropy.float()
    dx, dw, db32 = rb.run(given=(sel(lse32), sel(mu), sel(gl), sel(gh)))
    db = db32.to(bias.dtype) if db32 is not None else None
    return dx, dw, db
