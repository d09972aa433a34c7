"""Triton kernels in fp32 on a GPU against a float64 reference computed on the GPU (skipped without CUDA).

fp32 inputs with exact fp32 products (torch's default matmul precision "highest", which the kernels follow):
logp, lse, entropy and the gradients dX, dW, db must be within 1e-4 relative of the float64 reference, element
by element, with the tensor's mean magnitude as the floor for elements near zero:
``|kernel - ref64| <= 1e-4 * (|ref64| + mean |ref64|)``.

Shapes are benchmark-like, at the real tile sizes, with tails: N = 4099 rows (64 * 64 + 3, 32 * 128 + 3),
V = 32771 columns (256 * 128 + 3), H = 1024 or 1000 (a tail in H too). The last three vocabulary columns carry
large logits in many rows and some targets sit there, in the last row block too, so that a dropped or misread
tail tile moves lse and logp by far more than the tolerance. Outputs are NaN-poisoned before every launch
(RUBRIC_FAST_POISON=1). Old log-probs keep every importance ratio at least 0.07 (in log space) away from a clip
boundary, so that kernel and reference take the same branch of every min / clamp. Inputs are fresh random
numbers in every test; the seed is in every failure message.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
from gpu_marks import TRITON_GPU  # noqa: E402
pytestmark = TRITON_GPU

DEV = "cuda"
RTOL = 1e-4
N, V = 4099, 32771
SEQ_LEN = 97
# log-ratio offsets per sequence: at least 0.07 from log(1 + 0.2) = 0.182 and log(1 - 0.2) = -0.223
LOG_RATIO_OFFSETS = (-0.45, -0.3, -0.1, -0.05, 0.0, 0.05, 0.1, 0.3, 0.45)


@pytest.fixture(autouse=True)
def _exact_fp32_and_poison(monkeypatch):
    monkeypatch.setenv("RUBRIC_FAST_POISON", "1")  # fresh outputs NaN-filled before each launch
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32, in torch and in the kernels' tl.dot
    yield
    torch.set_float32_matmul_precision(previous)


def _gen():
    seed = random.randrange(2**31)
    return torch.Generator(device=DEV).manual_seed(seed), seed


def _inputs(g, n, h, v, *, bias=False, scale=1.0, tail_boost=5.0, dtype=torch.float32):
    x = torch.randn(n, h, generator=g, device=DEV) * scale
    w = torch.randn(v, h, generator=g, device=DEV) / h ** 0.5
    w[-3:] *= tail_boost  # the tail tile's columns hold much of the probability in many rows
    b = 0.5 * torch.randn(v, generator=g, device=DEV) if bias else None
    t = torch.randint(0, v, (n,), generator=g, device=DEV)
    t[::61] = v - 1
    t[1::61] = v - 2
    t[-2:] = v - 1  # the tail row block has tail-column targets too
    t[5::53] = -100
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), t


def _check(got, want, what, rtol=RTOL):
    """|got - want| <= rtol * (|want| + mean |want|), element by element."""
    assert got is not None, f"{what}: missing"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.double(), want.double()
    assert torch.isfinite(g).all(), f"{what}: {int((~torch.isfinite(g)).sum())} non-finite (unwritten?) elements"
    err = (g - w).abs()
    bound = rtol * (w.abs() + w.abs().mean())
    bad = err > bound
    if bad.any():
        i = int(torch.argmax(err - bound))
        raise AssertionError(f"{what}: {int(bad.sum())} of {w.numel()} elements beyond {rtol:g} relative; worst at "
                             f"flat index {i}: got {g.flatten()[i].item():.6e}, want {w.flatten()[i].item():.6e}")


def _rule(kernel, torch_same, ref64, factor, what, atol_rel=1e-5):
    """STYLE.md's error ratio: max|kernel - ref64| <= factor * max|torch_same_dtype - ref64| + atol."""
    assert torch.isfinite(kernel).all(), f"{what}: non-finite"
    atol = atol_rel * max(1.0, ref64.abs().max().item())
    ek = (kernel.double() - ref64.double()).abs().max().item()
    et = (torch_same.double() - ref64.double()).abs().max().item()
    assert ek <= factor * et + atol, f"{what}: kernel err {ek:.3e} > {factor} * torch err {et:.3e} + {atol:.1e}"


def _ref_lle(x, w, b, t, temperature, gl, gh):
    """float64 reference on the GPU (chunked: no N x V tensor): logp, entropy, lse and the gradients of
    sum(gl * logp + gh * entropy)."""
    from rubric_fast.reference import linear_logprob_entropy as ref_lle

    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    lp, en, lse = ref_lle(x64, w64, t, bias=b64, temperature=temperature)
    (lp * gl.double() + en * gh.double()).sum().backward()
    return dict(logp=lp.detach(), entropy=en.detach(), lse=lse, dx=x64.grad, dw=w64.grad,
                db=None if b64 is None else b64.grad)


# ------------------------------------------------------------------------------------------------------
# linear -> log-prob / entropy, forward and backward launchers


@pytest.mark.parametrize("n,h,v,temperature,with_bias", [(N, 1024, V, 1.0, False), (N, 1000, V, 0.7, True),
                                                         (1, 1024, 50257, 1.3, True)])
def test_lle_fp32(n, h, v, temperature, with_bias):
    from rubric_fast.kernels.linear_logprob_entropy import (
        linear_logprob_entropy_bwd,
        linear_logprob_entropy_fwd,
    )

    g, seed = _gen()
    tag = f"N={n} H={h} V={v} T={temperature} bias={with_bias} seed={seed}"
    x, w, b, t = _inputs(g, n, h, v, bias=with_bias)
    gl = torch.randn(n, generator=g, device=DEV)
    gh = torch.randn(n, generator=g, device=DEV)
    lp, en, lse = linear_logprob_entropy_fwd(x, w, t, b, temperature, -100)
    dx, dw, db = linear_logprob_entropy_bwd(x, w, t, b, lse, en, gl, gh, temperature, -100, True, True, with_bias)
    ref = _ref_lle(x, w, b, t, temperature, gl, gh)
    assert lp.dtype == en.dtype == lse.dtype == torch.float32
    assert (lp <= 0).all() and (en >= 0).all(), f"logp > 0 or entropy < 0 ({tag})"
    _check(lp, ref["logp"], f"logp ({tag})")
    _check(en, ref["entropy"], f"entropy ({tag})")
    _check(lse, ref["lse"], f"lse ({tag})")
    assert dx.dtype == torch.float32 and dw.dtype == torch.float32
    _check(dx, ref["dx"], f"dhidden ({tag})")
    _check(dw, ref["dw"], f"dweight ({tag})")
    if with_bias:
        _check(db, ref["db"], f"dbias ({tag})")


def test_lle_fp32_public_op():
    """The same check through rubric_fast.ops (Triton backend, autograd through the registered op)."""
    from rubric_fast import ops

    g, seed = _gen()
    x, w, b, t = _inputs(g, N, 1024, V, bias=True)
    gl = torch.randn(N, generator=g, device=DEV)
    gh = torch.randn(N, generator=g, device=DEV)
    xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    with ops.use_backend("triton"):
        lp, en, lse = ops.linear_logprob_entropy(xr, wr, t, bias=br, temperature=0.9)
        (lp * gl + en * gh).sum().backward()
    ref = _ref_lle(x, w, b, t, 0.9, gl, gh)
    tag = f"public op, seed={seed}"
    for name, got in (("logp", lp), ("entropy", en), ("lse", lse)):
        _check(got.detach(), ref[name], f"{name} ({tag})")
    _check(xr.grad, ref["dx"], f"dhidden ({tag})")
    _check(wr.grad, ref["dw"], f"dweight ({tag})")
    _check(br.grad, ref["db"], f"dbias ({tag})")


def test_large_logits_fp32():
    """Logits of size 1e4 (hidden states of scale 3e3), half the targets at each row's top logit: logp <= 0
    and entropy >= 0 everywhere, logp and lse within 1e-4 of the reference. Near the top logit, where logp is
    close to 0, and for the gradients, the error-ratio rule against materialized fp32 PyTorch, with an atol of
    the resolution of an fp32 lse at that size (eps32 * |lse|, about 1e-3; ten times that, relative to the
    largest element, for the gradients, which sum many rows): the op hands lse to its backward as fp32, and
    log(1 + tiny) is below that resolution. (PyTorch's log_softmax, which subtracts the max
    before the log, is about that much better on the near-zero log-probs.)"""
    from rubric_fast.kernels.linear_logprob_entropy import (
        linear_logprob_entropy_bwd,
        linear_logprob_entropy_fwd,
    )

    g, seed = _gen()
    n, h, v = 1027, 256, 10007
    x, w, _, t = _inputs(g, n, h, v, scale=3e3, tail_boost=1.0)
    z64 = x.double() @ w.double().T
    top = torch.zeros(n, dtype=torch.bool, device=DEV)
    top[: n // 2] = True
    top &= t != -100
    t = torch.where(top, z64.argmax(1), t)
    assert z64.abs().max() > 5e3
    gl = torch.randn(n, generator=g, device=DEV)
    gh = torch.zeros(n, device=DEV)
    lp, en, lse = linear_logprob_entropy_fwd(x, w, t, None, 1.0, -100)
    dx, dw, _ = linear_logprob_entropy_bwd(x, w, t, None, lse, en, gl, gh, 1.0, -100, True, True, False)
    ref = _ref_lle(x, w, None, t, 1.0, gl, gh)
    tag = f"seed={seed}"
    assert (lp <= 0).all(), f"positive log-prob {lp.max().item():.3e} at logits of size 1e4 ({tag})"
    assert (en >= 0).all(), f"negative entropy {en.min().item():.3e} ({tag})"
    _check(lp, ref["logp"], f"logp ({tag})")
    _check(lse, ref["lse"], f"lse ({tag})")
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    lsm = torch.log_softmax(xt @ wt.T, -1)
    tlp = lsm.gather(1, t.clamp_min(0)[:, None]).squeeze(1).masked_fill(t == -100, 0.0)
    ten = -(lsm.exp() * lsm).sum(-1).masked_fill(t == -100, 0.0)
    (tlp * gl).sum().backward()
    lse_res = torch.finfo(torch.float32).eps * ref["lse"].abs().max().item()
    _rule(lp[top], tlp.detach()[top], ref["logp"][top], 2, f"logp at the top logit ({tag})", atol_rel=lse_res)
    _rule(en, ten.detach(), ref["entropy"], 2, f"entropy ({tag})", atol_rel=lse_res)
    # every row's dlogits carry its lse's rounding (p = exp(z - lse)); dX and dW add up such rows
    _rule(dx, xt.grad, ref["dx"], 3, f"dhidden ({tag})", atol_rel=10 * lse_res)
    _rule(dw, wt.grad, ref["dw"], 3, f"dweight ({tag})", atol_rel=10 * lse_res)


# ------------------------------------------------------------------------------------------------------
# the fused policy loss launcher, every schedule


def _old_logp(g, lp64, seq):
    """Old log-probs = the reference's own minus a per-sequence offset from LOG_RATIO_OFFSETS: token and
    sequence (GSPO) log-ratios stay away from the clip boundaries."""
    offs = torch.tensor(LOG_RATIO_OFFSETS, device=DEV, dtype=torch.float64)
    n_seq = int(seq.max()) + 1
    pick = torch.randint(0, len(LOG_RATIO_OFFSETS), (n_seq,), generator=g, device=DEV)
    return (lp64 - offs[pick][seq]).float()


FUSED_CASES = [
    # loss, aggregation, schedule, top fraction, entropy mask given, bias, temperature, workspace MiB
    ("ppo_clip", "token_mean", "fused", None, False, True, 1.0, "16"),
    ("ppo_clip", "token_mean", "recompute", None, False, False, 0.7, None),
    ("ppo_clip", "seq_mean_token_mean", "auto", None, False, True, 1.3, "16"),
    ("ppo_clip", "token_mean", "auto", 0.2, False, False, 1.0, "16"),
    ("cispo", "token_mean", "fused", None, True, False, 1.0, None),
    ("cispo", "seq_mean_token_mean", "recompute", 0.2, False, True, 1.0, None),
    ("gspo", "seq_mean_token_mean", "auto", 0.2, False, True, 0.8, None),
    ("gspo", "token_mean", "fused", None, False, False, 1.0, "16"),  # fused does not apply: recompute
]


@pytest.mark.parametrize("loss,agg,schedule,top,mask_given,with_bias,temperature,ws_mb", FUSED_CASES)
def test_fused_policy_loss_fp32(loss, agg, schedule, top, mask_given, with_bias, temperature, ws_mb, monkeypatch):
    from rubric_fast.kernels.fused_linear_policy_loss import fused_linear_policy_loss_fwd_bwd

    from rubric_fast import reference as ref
    from rubric_fast.reference import PolicyLossConfig

    if ws_mb is not None:
        monkeypatch.setenv("RUBRIC_FAST_WORKSPACE_MB", ws_mb)  # 16 MiB: blocks of 128 rows, 33 of them
    g, seed = _gen()
    tag = f"{loss} {agg} {schedule} top={top} mask={mask_given} bias={with_bias} T={temperature} ws={ws_mb} seed={seed}"
    x, w, b, t = _inputs(g, N, 1024, V, bias=with_bias)
    seq = torch.arange(N, device=DEV) // SEQ_LEN
    with torch.no_grad():
        lp_ref = ref.linear_logprob_entropy(x.double(), w.double(), t, bias=None if b is None else b.double(),
                                            temperature=temperature)[0]
    old = _old_logp(g, lp_ref, seq)
    reflp = (lp_ref + 0.1 * torch.randn(N, generator=g, device=DEV, dtype=torch.float64)).float()
    adv = torch.randn(N, generator=g, device=DEV)
    lw = (torch.rand(N, generator=g, device=DEV) > 0.1).float() * (t != -100)
    emask = (torch.rand(N, generator=g, device=DEV) < 0.3) if mask_given else None
    cfg = PolicyLossConfig(loss=loss, aggregation=agg, beta=0.04, entropy_coef=0.01, top_entropy_fraction=top)
    fparams, iparams = cfg.to_op_args()

    out = fused_linear_policy_loss_fwd_bwd(x, w, t, old, adv, lw, reflp, None, seq,
                                           None if emask is None else emask.float(),  # as rubric_fast.ops passes it
                                           fparams, iparams, b, temperature, -100, True, True, with_bias,
                                           schedule=schedule)
    loss_k, stats_k, lp, en, dx, dw, db = out
    if top is not None and emask is None:
        # the reference selects from the kernel's own entropies (checked against the reference below), so a
        # near-tie at the selection boundary cannot make them train on different tokens
        emask = ref.entropy_mask(en, (lw != 0) & (t != -100), top)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    l64, s64, lp64, en64 = ref.fused_linear_policy_loss(
        x64, w64, t, old.double(), adv.double(), lw.double(), ref_logp=reflp.double(), seq_index=seq,
        entropy_mask=emask, config=cfg, bias=b64, temperature=temperature)
    l64.backward()

    scale = float((lw * adv.abs()).sum() / lw.sum())
    assert abs(loss_k.item() - l64.item()) <= RTOL * (abs(l64.item()) + scale), \
        f"loss {loss_k.item():.8e} vs {l64.item():.8e} ({tag})"
    stats64 = torch.stack([s.double() for s in s64])
    assert (stats_k.double() - stats64).abs().max().item() <= 1e-5, f"stats {stats_k.tolist()} vs {stats64.tolist()}"
    _check(lp, lp64.detach(), f"logp ({tag})")
    _check(en, en64.detach(), f"entropy ({tag})")
    _check(dx, x64.grad, f"dhidden ({tag})")
    _check(dw, w64.grad, f"dweight ({tag})")
    if with_bias:
        _check(db, b64.grad, f"dbias ({tag})")
