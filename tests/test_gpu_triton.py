"""Triton launchers on a CUDA device in bf16 against the float64 reference (skipped without CUDA).

Tolerances compare errors, not values (STYLE.md): a bf16 kernel passes when
max|kernel - ref64| <= 2 * max|torch_bf16 - ref64| + atol (3x for gradients), where torch_bf16 is the
plain materialized PyTorch computation in the same dtype. The forward statistics (logp, entropy, lse) are
also held to 1e-4 relative of the reference: the kernels accumulate the bf16 products in fp32, and the
reference starts from the same bf16 numbers, so anything looser hides a real fault (a dropped tail tile moves
lse by about 1e-3 at these shapes, inside the bf16 error-ratio allowance). Shapes have tails in N and V
(N = 4099 = 32 * 128 + 3, V = 32771 = 128 * 256 + 3); the last three vocabulary columns carry large logits
and some targets. Outputs are NaN-poisoned before every launch; inputs are fresh random numbers (the seed is
in every failure message). fp32 at 1e-4: tests/test_gpu_fp32.py; N x V > 2^31: tests/test_gpu_large.py.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
from gpu_marks import TRITON_GPU  # noqa: E402
pytestmark = TRITON_GPU

DEV = "cuda"
BF16 = torch.bfloat16
# log-ratio offsets per sequence: at least 0.07 from log(1 + 0.2) = 0.182 and log(1 - 0.2) = -0.223
LOG_RATIO_OFFSETS = (-0.45, -0.3, -0.1, -0.05, 0.0, 0.05, 0.1, 0.3, 0.45)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("RUBRIC_FAST_POISON", "1")  # fresh outputs NaN-filled before each launch


def _gen():
    seed = random.randrange(2**31)
    return torch.Generator(device=DEV).manual_seed(seed), seed


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _rule(kernel, torch_same, ref64, factor, what, atol_rel=1e-3):
    assert torch.isfinite(kernel).all(), f"{what}: non-finite"
    atol = atol_rel * max(1.0, ref64.abs().max().item())
    ek, et = _err(kernel, ref64), _err(torch_same, ref64)
    assert ek <= factor * et + atol, f"{what}: kernel err {ek:.3e} > {factor} * torch err {et:.3e} + {atol:.1e}"


def _close(got, want, what, rtol=1e-4):
    """|got - want| <= rtol * (|want| + mean |want|), element by element (fp32-accumulated statistics)."""
    g, w = got.double(), want.double()
    assert torch.isfinite(g).all(), f"{what}: non-finite (unwritten?) elements"
    err = (g - w).abs()
    bad = err > rtol * (w.abs() + w.abs().mean())
    assert not bad.any(), f"{what}: {int(bad.sum())} of {w.numel()} beyond {rtol:g} relative, max err {err.max():.3e}"


def _torch_lle(x, w, t, b, temperature):
    """Materialized PyTorch in the inputs' dtype (the anchor every trainer uses)."""
    z = x @ w.T
    if b is not None:
        z = z + b
    z = z.float() / temperature
    lsm = torch.log_softmax(z, -1)
    ign = t == -100
    logp = lsm.gather(1, t.clamp_min(0)[:, None]).squeeze(1).masked_fill(ign, 0.0)
    ent = -(lsm.exp() * lsm).sum(-1).masked_fill(ign, 0.0)
    return logp, ent


def _inputs(g, n, h, v, dtype=BF16, with_bias=True, scale=1.0, tail_boost=5.0):
    x = (torch.randn(n, h, generator=g, device=DEV) * scale).to(dtype)
    w = torch.randn(v, h, generator=g, device=DEV) / h ** 0.5
    w[-3:] *= tail_boost  # the tail tile's columns hold much of the probability in many rows
    w = w.to(dtype)
    b = torch.randn(v, generator=g, device=DEV).to(dtype) if with_bias else None
    t = torch.randint(0, v, (n,), generator=g, device=DEV)
    t[::61] = v - 1
    t[-2:] = v - 1
    t[torch.randperm(n, generator=g, device=DEV)[: max(1, n // 50)]] = -100
    return x, w, b, t


@pytest.mark.parametrize("n,h,v,temperature,with_bias", [(1, 256, 1000, 1.0, False), (4099, 2048, 32771, 0.8, True),
                                                         (2048, 2048, 50257, 1.0, False)])
def test_lle_bf16_fwd_bwd(n, h, v, temperature, with_bias):
    from rubric_fast.kernels.linear_logprob_entropy import (
        linear_logprob_entropy_bwd,
        linear_logprob_entropy_fwd,
    )

    from rubric_fast.reference import linear_logprob_entropy as ref_lle

    g, seed = _gen()
    tag = f"N={n} H={h} V={v} seed={seed}"
    x, w, b, t = _inputs(g, n, h, v, with_bias=with_bias)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    rl, re, rs = ref_lle(x64, w64, t, bias=b64, temperature=temperature)
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    bt = b.clone().requires_grad_() if b is not None else None
    tl_, te = _torch_lle(xt, wt, t, bt, temperature)
    lp, en, ls = linear_logprob_entropy_fwd(x, w, t, b, temperature, -100)
    _rule(lp, tl_.detach(), rl.detach(), 2, f"logp ({tag})")
    _rule(en, te.detach(), re.detach(), 2, f"entropy ({tag})")
    _close(lp, rl.detach(), f"logp ({tag})")
    _close(en, re.detach(), f"entropy ({tag})")
    _close(ls, rs, f"lse ({tag})")
    assert (lp <= 0).all(), f"positive log-prob ({tag})"
    gl = torch.randn(n, generator=g, device=DEV, dtype=torch.float64)
    gh = torch.randn(n, generator=g, device=DEV, dtype=torch.float64)
    (rl * gl + re * gh).sum().backward()
    (tl_ * gl.float() + te * gh.float()).sum().backward()
    dx, dw, db = linear_logprob_entropy_bwd(x, w, t, b, ls, en, gl.float(), gh.float(), temperature, -100,
                                            True, True, b is not None)
    assert dx.dtype == BF16 and dw.dtype == BF16
    _rule(dx, xt.grad, x64.grad, 3, f"dhidden ({tag})")
    _rule(dw, wt.grad, w64.grad, 3, f"dweight ({tag})")
    if b is not None:
        _rule(db, bt.grad, b64.grad, 3, f"dbias ({tag})")


def test_lle_large_logits_bf16():
    """Logits of size 1e4, half the targets at the row's top logit: logp <= 0, entropy >= 0, and the
    error-ratio rule against materialized bf16 PyTorch."""
    from rubric_fast.kernels.linear_logprob_entropy import (
        linear_logprob_entropy_bwd,
        linear_logprob_entropy_fwd,
    )

    from rubric_fast.reference import linear_logprob_entropy as ref_lle

    g, seed = _gen()
    n, h, v = 515, 256, 5003
    x, w, b, t = _inputs(g, n, h, v, scale=3e3, tail_boost=1.0)
    z64 = x.double() @ w.double().T + b.double()
    top = torch.zeros(n, dtype=torch.bool, device=DEV)
    top[: n // 2] = True
    top &= t != -100
    t = torch.where(top, z64.argmax(1), t)
    lp, en, ls = linear_logprob_entropy_fwd(x, w, t, b, 1.0, -100)
    assert ls.abs().max() > 1e3
    assert (lp <= 0).all(), f"positive log-prob {lp.max().item():.3e} (seed={seed})"
    assert (en >= 0).all(), f"negative entropy {en.min().item():.3e} (seed={seed})"
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    rl, re, rs = ref_lle(x64, w64, t, bias=b.double())
    _close(ls, rs, f"lse at logits of 1e4 (seed={seed})")
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    tl_, te = _torch_lle(xt, wt, t, b, 1.0)
    _rule(lp, tl_.detach(), rl.detach(), 2, f"logp at logits of 1e4 (seed={seed})")
    _rule(en, te.detach(), re.detach(), 2, f"entropy at logits of 1e4 (seed={seed})")
    gl = torch.randn(n, generator=g, device=DEV, dtype=torch.float64)
    (rl * gl).sum().backward()
    (tl_ * gl.float()).sum().backward()
    dx, dw, db = linear_logprob_entropy_bwd(x, w, t, b, ls, en, gl.float(), None, 1.0, -100, True, True, True)
    assert torch.isfinite(db.float()).all()
    _rule(dx, xt.grad, x64.grad, 3, f"dhidden at logits of 1e4 (seed={seed})")
    _rule(dw, wt.grad, w64.grad, 3, f"dweight at logits of 1e4 (seed={seed})")


def test_lle_more_than_65535_rows():
    from rubric_fast.kernels.linear_logprob_entropy import (
        linear_logprob_entropy_bwd,
        linear_logprob_entropy_fwd,
    )

    from rubric_fast.reference import linear_logprob_entropy as ref_lle

    g, seed = _gen()
    n, h, v = 70_001, 64, 515
    x, w, b, t = _inputs(g, n, h, v)
    x64 = x.double().requires_grad_()
    rl, re, _ = ref_lle(x64, w.double(), t, bias=b.double())
    xt = x.clone().requires_grad_()
    tl_, te = _torch_lle(xt, w, t, b, 1.0)
    lp, en, ls = linear_logprob_entropy_fwd(x, w, t, b, 1.0, -100)
    _rule(lp, tl_.detach(), rl.detach(), 2, f"logp (N > 65535, seed={seed})")
    _rule(en, te.detach(), re.detach(), 2, f"entropy (N > 65535, seed={seed})")
    _close(lp, rl.detach(), f"logp (N > 65535, seed={seed})")
    gl = torch.randn(n, generator=g, device=DEV, dtype=torch.float64)
    (rl * gl).sum().backward()
    (tl_ * gl.float()).sum().backward()
    dx, _, _ = linear_logprob_entropy_bwd(x, w, t, b, ls, en, gl.float(), None, 1.0, -100, True, False, False)
    _rule(dx, xt.grad, x64.grad, 3, f"dhidden (N > 65535, seed={seed})")


def test_mm_accumulate_f32_paths():
    from rubric_fast.kernels import linear_logprob_entropy as lle

    if not (hasattr(lle, "mm_accumulate_f32") and hasattr(lle, "FORCE_TRITON_MM")):
        pytest.skip("the launcher has no mm_accumulate_f32 / FORCE_TRITON_MM any more")
    a = torch.randn(300, 1000, device=DEV).to(BF16)
    b = torch.randn(1000, 200, device=DEV).to(BF16)
    want = a.double() @ b.double()
    for force in (False, True):
        lle.FORCE_TRITON_MM = force
        try:
            c = torch.ones(300, 200, device=DEV)
            lle.mm_accumulate_f32(c, a, b)
        finally:
            lle.FORCE_TRITON_MM = False
        assert _err(c - 1.0, want) <= 1e-3 * want.abs().max().item(), f"force_triton={force}"


FUSED_CASES = [
    # loss, aggregation, top fraction, schedule, workspace MiB, dW accumulation
    ("ppo_clip", "token_mean", None, "fused", "16", "fp32"),
    ("ppo_clip", "token_mean", None, "fused", "16", "weight"),
    ("ppo_clip", "seq_mean_token_mean", None, "recompute", None, None),
    ("cispo", "constant", None, "auto", None, None),
    ("gspo", "seq_mean_token_mean", 0.2, "auto", None, None),
    ("sapo", "token_mean", 0.2, "recompute", "16", None),
]


@pytest.mark.parametrize("loss,agg,top,schedule,workspace_mb,dw_accum", FUSED_CASES)
def test_fused_bf16(loss, agg, top, schedule, workspace_mb, dw_accum, monkeypatch):
    from rubric_fast.kernels.fused_linear_policy_loss import fused_linear_policy_loss_fwd_bwd

    from rubric_fast import reference as ref
    from rubric_fast.reference import PolicyLossConfig

    if workspace_mb is not None:
        monkeypatch.setenv("RUBRIC_FAST_WORKSPACE_MB", workspace_mb)  # 16 MiB: several row blocks
    if dw_accum is not None:
        monkeypatch.setenv("RUBRIC_FAST_DW_ACCUM", dw_accum)
    g, seed = _gen()
    tag = f"{loss} {agg} top={top} {schedule} ws={workspace_mb} dw={dw_accum} seed={seed}"
    n, h, v = 1500, 1024, 32007
    x, w, _, t = _inputs(g, n, h, v, with_bias=False)
    seq = torch.arange(n, device=DEV) // 100
    with torch.no_grad():
        lp0 = ref.linear_logprob_entropy(x.double(), w.double(), t)[0]
    offs = torch.tensor(LOG_RATIO_OFFSETS, device=DEV, dtype=torch.float64)
    old = (lp0 - offs[torch.randint(0, len(offs), (int(seq.max()) + 1,), generator=g, device=DEV)][seq]).float()
    lp0 = lp0.float()
    adv = torch.randn(n, generator=g, device=DEV)
    lw = (torch.rand(n, generator=g, device=DEV) > 0.1).float() * (t != -100)
    reflp = lp0 + 0.1 * torch.randn(n, generator=g, device=DEV)
    cfg = PolicyLossConfig(loss=loss, aggregation=agg, beta=0.04, entropy_coef=0.001, top_entropy_fraction=top,
                           normalizer=2000.0 if agg == "constant" else None)
    fparams, iparams = cfg.to_op_args()
    out = fused_linear_policy_loss_fwd_bwd(x, w, t, old, adv, lw, reflp, None, seq, None, fparams, iparams, None,
                                           1.0, -100, True, True, False, schedule=schedule)
    loss_k, stats_k, lp, en, dx, dw, _ = out
    emask = None
    if top is not None:
        # the selection from the kernel's own entropies (checked below), shared by the reference and the anchor
        emask = ref.entropy_mask(en, (lw != 0) & (t != -100), top)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    l64, s64, lp64, en64 = ref.fused_linear_policy_loss(x64, w64, t, old.double(), adv.double(), lw.double(),
                                                        ref_logp=reflp.double(), seq_index=seq, entropy_mask=emask,
                                                        config=cfg)
    l64.backward()
    # the bf16 anchor: materialized bf16 logits, then the same loss and selection
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    tlp, ten = _torch_lle(xt, wt, t, None, 1.0)
    lt, _ = ref.policy_loss(tlp, old, adv, lw, ref_logp=reflp, seq_index=seq, config=cfg, entropy=ten,
                            entropy_mask=emask)
    lt.backward()
    _rule(loss_k, lt.detach(), l64.detach(), 2, f"loss ({tag})", atol_rel=1e-4)
    scale = float((lw * adv.abs()).sum() / lw.sum())
    assert abs(loss_k.item() - l64.item()) <= 1e-4 * (abs(l64.item()) + scale), f"loss vs fp64 ({tag})"
    assert _err(stats_k, torch.stack([s.double() for s in s64])) <= 1e-5, f"stats ({tag})"
    _rule(lp, tlp.detach(), lp64.detach(), 2, f"logp ({tag})")
    _close(lp, lp64.detach(), f"logp ({tag})")
    _close(en, en64.detach(), f"entropy ({tag})")
    _rule(dx, xt.grad, x64.grad, 3, f"dhidden ({tag})")
    _rule(dw, wt.grad, w64.grad, 3, f"dweight ({tag})")


def test_policy_loss_gpu_fp32():
    from rubric_fast.kernels.policy_loss import policy_loss_fwd_bwd

    from rubric_fast import reference as ref
    from rubric_fast.reference import PolicyLossConfig

    n = 100_003
    lp = (torch.randn(n, device=DEV, dtype=torch.float64) * 0.5 - 1).float().double()
    old = (lp + 0.3 * torch.randn_like(lp)).float().double()
    adv = torch.randn_like(lp).float().double()
    w = (torch.rand_like(lp) > 0.2).double()
    seq = torch.arange(n, device=DEV) // 333
    for loss in ("ppo_clip", "gspo"):
        cfg = PolicyLossConfig(loss=loss, aggregation="seq_mean_token_mean", dual_clip=3.0)
        lpr = lp.clone().requires_grad_()
        l64, s64 = ref.policy_loss(lpr, old, adv, w, seq_index=seq, config=cfg)
        l64.backward()
        fparams, iparams = cfg.to_op_args()
        l32, s32, gl, _ = policy_loss_fwd_bwd(lp.float(), old.float(), adv.float(), w.float(), None, None, seq,
                                              None, None, fparams, iparams)
        assert abs(l32.item() - l64.item()) <= 1e-5 * max(1.0, abs(l64.item()))
        assert _err(gl, lpr.grad) <= 1e-5 * max(1e-6, lpr.grad.abs().max().item()) + 1e-9
        assert _err(s32, torch.stack([s.double() for s in s64])) <= 1e-5
