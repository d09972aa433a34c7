"""Reference linear_logprob_entropy: hand-computed values, float64 gradcheck, chunked == materialized.

Hand cases use W = [[1, 0], [0, 1], [0, 0]] (H = 2, V = 3), so the logits of a row x are (x0, x1, 0) + b,
which makes every probability a simple fraction.
"""

from __future__ import annotations

import contextlib
import math
import random

import pytest
import torch

import importlib

from rubric_fast.reference import linear_logprob_entropy, linear_logprob_entropy_materialized

# `import rubric_fast.reference.linear_logprob_entropy as lle` would give the *function*: the package
# re-exports a function under the submodule's name.
lle = importlib.import_module("rubric_fast.reference.linear_logprob_entropy")

F64 = torch.float64
LN2, LN3 = math.log(2.0), math.log(3.0)


def _w():
    return torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=F64)


def _seed() -> int:
    seed = random.randrange(2**31)
    print(f"seed={seed}")  # shown by pytest on failure
    return seed


@contextlib.contextmanager
def small_chunks(row_chunk: int, vocab_chunk: int):
    """Force the chunked paths by patching the module's DEFAULT_ROW_CHUNK / DEFAULT_VOCAB_CHUNK (read at call
    time by forward_stats/backward_grads). A spy on _chunk_logits records the chunk shapes, so a test proves
    the chunking really happened (it fails if the constants ever stop being read at call time)."""
    saved = lle.DEFAULT_ROW_CHUNK, lle.DEFAULT_VOCAB_CHUNK, lle._chunk_logits
    orig_c = saved[2]
    shapes = []

    def c(x, weight, bias, v0, v1, temperature, dtype):
        z = orig_c(x, weight, bias, v0, v1, temperature, dtype)
        shapes.append(tuple(z.shape))
        return z

    lle.DEFAULT_ROW_CHUNK, lle.DEFAULT_VOCAB_CHUNK, lle._chunk_logits = row_chunk, vocab_chunk, c
    try:
        yield shapes
    finally:
        lle.DEFAULT_ROW_CHUNK, lle.DEFAULT_VOCAB_CHUNK, lle._chunk_logits = saved


# ---------------------------------------------------------------- hand-computed values


def test_hand_values_bias_and_ignored_row():
    # b = (0, 0, ln2)
    # row 0: x = (ln4, ln2) -> z = (ln4, ln2, ln2), exp = (4, 2, 2), sum 8 -> lse = ln8 = 3 ln2,
    #        p = (1/2, 1/4, 1/4); target 0: logp = ln4 - ln8 = -ln2;
    #        H = -sum p ln p = 1/2 ln2 + 2 * 1/4 ln4 = 1.5 ln2
    # row 1: x = (ln3, 0) -> z = (ln3, 0, ln2), exp = (3, 1, 2), sum 6 -> lse = ln6,
    #        p = (1/2, 1/6, 1/3); target 2: logp = ln2 - ln6 = -ln3;
    #        H = 1/2 ln2 + 1/6 ln6 + 1/3 ln3
    # row 2: target = ignore_index -> 0, 0, 0
    hidden = torch.tensor([[2 * LN2, LN2], [LN3, 0.0], [5.0, -7.0]], dtype=F64, requires_grad=True)
    bias = torch.tensor([0.0, 0.0, LN2], dtype=F64, requires_grad=True)
    weight = _w().requires_grad_(True)
    targets = torch.tensor([0, 2, -100])
    logp, ent, lse = linear_logprob_entropy(hidden, weight, targets, bias=bias)
    assert logp.dtype == ent.dtype == lse.dtype == F64
    exp_logp = torch.tensor([-LN2, -LN3, 0.0], dtype=F64)
    exp_ent = torch.tensor([1.5 * LN2, 0.5 * LN2 + math.log(6) / 6 + LN3 / 3, 0.0], dtype=F64)
    exp_lse = torch.tensor([3 * LN2, math.log(6), 0.0], dtype=F64)
    torch.testing.assert_close(logp, exp_logp, rtol=0, atol=1e-14)
    torch.testing.assert_close(ent, exp_ent, rtol=0, atol=1e-14)
    torch.testing.assert_close(lse, exp_lse, rtol=0, atol=1e-14)
    # ignored row: exactly zero and no gradient, even with nonzero upstream gradients
    assert logp[2].item() == 0.0 and ent[2].item() == 0.0 and lse[2].item() == 0.0
    (logp.sum() + 3.0 * ent.sum()).backward()
    assert torch.all(hidden.grad[2] == 0)
    # row-0 only part of the gradient, by hand: d logp_0 / d z = onehot(0) - p = (1/2, -1/4, -1/4)
    # row 1: onehot(2) - p = (-1/2, -1/6, 2/3); dX_i = dz_i W = (dz_i0, dz_i1)
    # entropy: dH/dz = -p (z - mu); row 0 mu = 1/2 ln4 + 1/4 ln2 + 1/4 ln2 = 1.5 ln2,
    #   z - mu = (0.5, -0.5, -0.5) ln2 -> dH/dz = (-1/4, 1/8, 1/8) ln2
    dz0 = torch.tensor([0.5, -0.25, -0.25], dtype=F64) + 3.0 * torch.tensor([-0.25, 0.125, 0.125], dtype=F64) * LN2
    torch.testing.assert_close(hidden.grad[0], dz0[:2], rtol=0, atol=1e-14)


def test_hand_values_temperature_gradients():
    # T = 2, b = (0, 0, ln4), x = (2 ln4, 2 ln2): z = (2 ln4, 2 ln2, ln4) / 2 = (ln4, ln2, ln2)
    # -> same distribution as above: lse = 3 ln2, p = (1/2, 1/4, 1/4), logp(target 0) = -ln2, H = 1.5 ln2
    hidden = torch.tensor([[4 * LN2, 2 * LN2]], dtype=F64, requires_grad=True)
    weight = _w().requires_grad_(True)
    bias = torch.tensor([0.0, 0.0, 2 * LN2], dtype=F64, requires_grad=True)
    logp, ent, lse = linear_logprob_entropy(hidden, weight, torch.tensor([0]), bias=bias, temperature=2.0)
    torch.testing.assert_close(logp, torch.tensor([-LN2], dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(ent, torch.tensor([1.5 * LN2], dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(lse, torch.tensor([3 * LN2], dtype=F64), rtol=0, atol=1e-14)
    # d logp / d logits = (onehot - p) / T = (1/2, -1/4, -1/4) / 2 = (1/4, -1/8, -1/8)
    # db = that; dX = dlogits W = (1/4, -1/8); dW = dlogits^T x (outer product)
    g_lp = torch.autograd.grad(logp.sum(), (hidden, weight, bias), retain_graph=True)
    dl = torch.tensor([0.25, -0.125, -0.125], dtype=F64)
    torch.testing.assert_close(g_lp[2], dl, rtol=0, atol=1e-14)
    torch.testing.assert_close(g_lp[0], torch.tensor([[0.25, -0.125]], dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(g_lp[1], dl[:, None] * hidden.detach(), rtol=0, atol=1e-14)
    # dH / d logits = -p (z - mu) / T, mu = 1.5 ln2, z - mu = (0.5, -0.5, -0.5) ln2
    # -> (-1/4, 1/8, 1/8) ln2 / 2 = (-1/8, 1/16, 1/16) ln2
    g_h = torch.autograd.grad(ent.sum(), (hidden, weight, bias))
    dh = torch.tensor([-0.125, 0.0625, 0.0625], dtype=F64) * LN2
    torch.testing.assert_close(g_h[2], dh, rtol=0, atol=1e-14)
    torch.testing.assert_close(g_h[0], dh[None, :2], rtol=0, atol=1e-14)
    torch.testing.assert_close(g_h[1], dh[:, None] * hidden.detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_huge_logits_are_finite(dtype):
    # H = 1, W = (1, 0, -1)^T, x = +-1e4 -> z = (1e4, 0, -1e4) or reversed
    # x = 1e4, target 0: lse = 1e4 + log(1 + e^-1e4 + e^-2e4) = 1e4, logp = 0, H = 0
    # x = 1e4, target 2: logp = -1e4 - 1e4 = -2e4
    # x = -1e4, target 2: logp = 0 ; target 0: logp = -2e4
    # second weight W2 = (1, 1, -1): x = 1e4 -> z = (1e4, 1e4, -1e4): lse = 1e4 + ln2, logp(0) = -ln2, H = ln2
    w = torch.tensor([[1.0], [0.0], [-1.0]], dtype=dtype, requires_grad=True)
    h = torch.tensor([[1e4], [1e4], [-1e4], [-1e4]], dtype=dtype, requires_grad=True)
    t = torch.tensor([0, 2, 2, 0])
    logp, ent, lse = linear_logprob_entropy(h, w, t)
    torch.testing.assert_close(logp, torch.tensor([0.0, -2e4, 0.0, -2e4], dtype=dtype), rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, torch.zeros(4, dtype=dtype), rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, torch.tensor([1e4, 1e4, 1e4, 1e4], dtype=dtype), rtol=0, atol=1e-6)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    w2 = torch.tensor([[1.0], [1.0], [-1.0]], dtype=dtype)
    logp2, ent2, lse2 = linear_logprob_entropy(torch.tensor([[1e4]], dtype=dtype), w2, torch.tensor([0]))
    # logp = (z_t - max) - log s and H = log s - sum p (z - max) never subtract two numbers of size 1e4, so
    # they are accurate to a few ulp of ln2; lse = max + log s is accurate to a few ulp(1e4).
    tol = dict(rtol=0, atol=4 * torch.finfo(dtype).eps)
    torch.testing.assert_close(logp2, torch.tensor([-LN2], dtype=dtype), **tol)
    torch.testing.assert_close(ent2, torch.tensor([LN2], dtype=dtype), **tol)
    torch.testing.assert_close(lse2, torch.tensor([1e4 + LN2], dtype=dtype), rtol=0,
                               atol=4 * 1e4 * torch.finfo(dtype).eps)


def test_return_entropy_false_and_errors():
    h = torch.randn(3, 2, dtype=F64)
    w = torch.randn(4, 2, dtype=F64)
    logp, ent, lse = linear_logprob_entropy(h, w, torch.tensor([0, 3, -100]), return_entropy=False)
    assert ent is None and logp.shape == lse.shape == (3,)
    with pytest.raises(ValueError, match="targets"):
        linear_logprob_entropy(h, w, torch.tensor([0, 4, 1]))  # 4 is outside [0, V)
    with pytest.raises(ValueError, match="targets"):
        linear_logprob_entropy(h, w, torch.tensor([0, -1, 1]))  # -1 is not ignore_index
    with pytest.raises(ValueError, match="temperature"):
        linear_logprob_entropy(h, w, torch.tensor([0, 1, 1]), temperature=0.0)
    # custom ignore_index
    logp, ent, lse = linear_logprob_entropy(h, w, torch.tensor([0, 7, 1]), ignore_index=7)
    assert logp[1] == 0 and ent[1] == 0 and lse[1] == 0


def test_empty_batch():
    h = torch.zeros(0, 3, dtype=F64, requires_grad=True)
    w = torch.randn(5, 3, dtype=F64, requires_grad=True)
    logp, ent, lse = linear_logprob_entropy(h, w, torch.zeros(0, dtype=torch.long))
    assert logp.shape == ent.shape == lse.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert torch.all(w.grad == 0) and h.grad.shape == (0, 3)


# ---------------------------------------------------------------- gradcheck


def _gradcheck_inputs(seed, n=5, h=3, v=7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64).requires_grad_(True)
    weight = torch.randn(v, h, generator=g, dtype=F64).requires_grad_(True)
    bias = torch.randn(v, generator=g, dtype=F64).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[1] = -100  # an ignored row
    return hidden, weight, bias, targets


@pytest.mark.parametrize("chunks", [None, (2, 3)])
def test_gradcheck_logp_and_entropy(chunks):
    seed = _seed()
    hidden, weight, bias, targets = _gradcheck_inputs(seed)

    def fn(hd, wt, bs):
        logp, ent, _ = linear_logprob_entropy(hd, wt, targets, bias=bs, temperature=0.7)
        return logp, ent

    ctx = small_chunks(*chunks) if chunks else contextlib.nullcontext([])
    with ctx as shapes:
        # full Jacobian unchunked; random projections (fast_mode) through the slow pure-Python chunk loops
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-8, rtol=1e-6,
                                        fast_mode=chunks is not None)
        # only-logp and only-entropy upstream (the other gradient arrives as None)
        assert torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c)[0], (hidden, weight, bias), fast_mode=True)
        assert torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c)[1], (hidden, weight, bias), fast_mode=True)
    if chunks:
        assert shapes and max(s[0] for s in shapes) <= chunks[0] and max(s[1] for s in shapes) <= chunks[1]
        assert len(shapes) > 2 * 7 // chunks[1]  # several row and vocab chunks, forward and backward


def test_gradcheck_without_bias_and_partial_requires_grad():
    seed = _seed()
    hidden, weight, _, targets = _gradcheck_inputs(seed, n=5, h=2, v=5)
    weight.requires_grad_(False)
    with small_chunks(2, 2):
        assert torch.autograd.gradcheck(
            lambda hd: linear_logprob_entropy(hd, weight, targets, temperature=1.3)[:2], (hidden,))
    hidden.requires_grad_(False)
    weight.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda wt: linear_logprob_entropy(hidden, wt, targets)[:2], (weight,))


# ---------------------------------------------------------------- chunked == materialized


@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("v", [5, 37, 130])
@pytest.mark.parametrize("chunks", [None, (4, 16)])
def test_chunked_equals_materialized(n, v, chunks):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    h = 11
    hidden = (torch.randn(n, h, generator=g, dtype=F64) * 2).requires_grad_(True)
    weight = torch.randn(v, h, generator=g, dtype=F64).requires_grad_(True)
    bias = torch.randn(v, generator=g, dtype=F64).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=g)
    if n > 1:
        targets[torch.randperm(n, generator=g)[: n // 3]] = -100
    temperature = 0.9
    g_lp = torch.randn(n, generator=g, dtype=F64)
    g_h = torch.randn(n, generator=g, dtype=F64)

    ctx = small_chunks(*chunks) if chunks else contextlib.nullcontext([])
    with ctx as shapes:
        logp, ent, lse = linear_logprob_entropy(hidden, weight, targets, bias=bias, temperature=temperature)
        grads = torch.autograd.grad((logp * g_lp).sum() + (ent * g_h).sum(), (hidden, weight, bias))
    if chunks and v > chunks[1]:
        assert max(s[1] for s in shapes) <= chunks[1]
    mlogp, ment, mlse = linear_logprob_entropy_materialized(hidden, weight, targets, bias=bias,
                                                            temperature=temperature)
    mgrads = torch.autograd.grad((mlogp * g_lp).sum() + (ment * g_h).sum(), (hidden, weight, bias))
    for a in (logp, ent, lse, *grads):
        assert not torch.isnan(a).any()
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp, mlogp, **tol, msg=f"logp seed={seed}")
    torch.testing.assert_close(ent, ment, **tol, msg=f"entropy seed={seed}")
    torch.testing.assert_close(lse, mlse, **tol, msg=f"lse seed={seed}")
    for name, a, b in zip(("dX", "dW", "db"), grads, mgrads):
        torch.testing.assert_close(a, b, **tol, msg=f"{name} seed={seed}")
