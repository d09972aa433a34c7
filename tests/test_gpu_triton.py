"""Triton launchers on a CUDA device in bf16 against the float64 reference (skipped without CUDA).

Tolerances compare errors, not values (STYLE.md): a bf16 kernel passes when
max|kernel - ref64| <= 2 * max|torch_bf16 - ref64| + atol (3x for gradients), where torch_bf16 is the
plain materialized PyTorch computation in the same dtype.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="GPU tests do not run in the interpreter"),
]

DEV = "cuda"
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("RUBRIC_FAST_POISON", "1")  # fresh outputs NaN-filled before each launch


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _rule(kernel, torch_same, ref64, factor, what, atol_rel=1e-3):
    assert torch.isfinite(kernel).all(), f"{what}: non-finite"
    atol = atol_rel * max(1.0, ref64.abs().max().item())
    ek, et = _err(kernel, ref64), _err(torch_same, ref64)
    assert ek <= factor * et + atol, f"{what}: kernel err {ek:.3e} > {factor} * torch err {et:.3e} + {atol:.1e}"


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


def _inputs(n, h, v, dtype=BF16, with_bias=True, scale=1.0):
    x = (torch.randn(n, h, device=DEV) * scale).to(dtype)
    w = (torch.randn(v, h, device=DEV) / h ** 0.5).to(dtype)
    b = torch.randn(v, device=DEV).to(dtype) if with_bias else None
    t = torch.randint(0, v, (n,), device=DEV)
    t[torch.randperm(n, device=DEV)[: max(1, n // 50)]] = -100
    return x, w, b, t


@pytest.mark.parametrize("n,h,v,temperature,with_bias", [(1, 256, 1000, 1.0, False), (517, 1024, 32007, 0.8, True),
                                                         (2048, 2048, 50257, 1.0, False)])
def test_lle_bf16_fwd_bwd(n, h, v, temperature, with_bias):
    from rubric_fast.kernels.linear_logprob_entropy import (
        linear_logprob_entropy_bwd,
        linear_logprob_entropy_fwd,
    )

    from rubric_fast.reference import linear_logprob_entropy as ref_lle

    x, w, b, t = _inputs(n, h, v, with_bias=with_bias)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    rl, re, rs = ref_lle(x64, w64, t, bias=b64, temperature=temperature)
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    bt = b.clone().requires_grad_() if b is not None else None
    tl_, te = _torch_lle(xt, wt, t, bt, temperature)
    lp, en, ls = linear_logprob_entropy_fwd(x, w, t, b, temperature, -100)
    _rule(lp, tl_.detach(), rl.detach(), 2, "logp")
    _rule(en, te.detach(), re.detach(), 2, "entropy")
    gl = torch.randn(n, device=DEV, dtype=torch.float64)
    gh = torch.randn(n, device=DEV, dtype=torch.float64)
    (rl * gl + re * gh).sum().backward()
    (tl_ * gl.float() + te * gh.float()).sum().backward()
    dx, dw, db = linear_logprob_entropy_bwd(x, w, t, b, ls, en, gl.float(), gh.float(), temperature, -100,
                                            True, True, b is not None)
    assert dx.dtype == BF16 and dw.dtype == BF16
    _rule(dx, xt.grad, x64.grad, 3, "dhidden")
    _rule(dw, wt.grad, w64.grad, 3, "dweight")
    if b is not None:
        _rule(db, bt.grad, b64.grad, 3, "dbias")


def test_lle_large_logits_bf16():
    from rubric_fast.kernels.linear_logprob_entropy import (
        linear_logprob_entropy_bwd,
        linear_logprob_entropy_fwd,
    )

    x, w, b, t = _inputs(64, 256, 5003, scale=1500.0)
    lp, en, ls = linear_logprob_entropy_fwd(x, w, t, b, 1.0, -100)
    assert ls.abs().max() > 1e3
    for a in (lp, en, ls):
        assert torch.isfinite(a).all()
    g = torch.ones(64, device=DEV)
    dx, dw, db = linear_logprob_entropy_bwd(x, w, t, b, ls, en, g, g, 1.0, -100, True, True, True)
    assert torch.isfinite(dx.float()).all() and torch.isfinite(dw.float()).all() and torch.isfinite(db.float()).all()


def test_lle_more_than_65535_rows():
    from rubric_fast.kernels.linear_logprob_entropy import (
        linear_logprob_entropy_bwd,
        linear_logprob_entropy_fwd,
    )

    from rubric_fast.reference import linear_logprob_entropy as ref_lle

    n, h, v = 70_001, 64, 515
    x, w, b, t = _inputs(n, h, v)
    x64 = x.double().requires_grad_()
    rl, re, _ = ref_lle(x64, w.double(), t, bias=b.double())
    xt = x.clone().requires_grad_()
    tl_, te = _torch_lle(xt, w, t, b, 1.0)
    lp, en, ls = linear_logprob_entropy_fwd(x, w, t, b, 1.0, -100)
    _rule(lp, tl_.detach(), rl.detach(), 2, "logp (N > 65535)")
    _rule(en, te.detach(), re.detach(), 2, "entropy (N > 65535)")
    gl = torch.randn(n, device=DEV, dtype=torch.float64)
    (rl * gl).sum().backward()
    (tl_ * gl.float()).sum().backward()
    dx, _, _ = linear_logprob_entropy_bwd(x, w, t, b, ls, en, gl.float(), None, 1.0, -100, True, False, False)
    _rule(dx, xt.grad, x64.grad, 3, "dhidden (N > 65535)")


def test_mm_accumulate_f32_paths():
    from rubric_fast.kernels import linear_logprob_entropy as lle

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


@pytest.mark.parametrize("loss,agg,top,workspace_mb", [("ppo_clip", "token_mean", None, "16"),
                                                        ("cispo", "constant", None, "512"),
                                                        ("gspo", "seq_mean_token_mean", 0.2, "512"),
                                                        ("sapo", "token_mean", 0.2, "512")])
def test_fused_bf16(loss, agg, top, workspace_mb, monkeypatch):
    from rubric_fast.kernels.fused_linear_policy_loss import fused_linear_policy_loss_fwd_bwd

    from rubric_fast import reference as ref
    from rubric_fast.reference import PolicyLossConfig

    monkeypatch.setenv("RUBRIC_FAST_WORKSPACE_MB", workspace_mb)  # 16 MiB: several one-pass row blocks
    monkeypatch.setenv("RUBRIC_FAST_FUSED_SCHEDULE", "one_pass" if workspace_mb == "16" else "auto")
    n, h, v = 1500, 1024, 32007
    x, w, b, t = _inputs(n, h, v, with_bias=False)
    with torch.no_grad():
        lp0 = ref.linear_logprob_entropy(x.double(), w.double(), t)[0].float()
    old = lp0 + 0.2 * torch.randn(n, device=DEV)
    adv = torch.randn(n, device=DEV)
    lw = (torch.rand(n, device=DEV) > 0.1).float()
    reflp = lp0 + 0.1 * torch.randn(n, device=DEV)
    seq = torch.arange(n, device=DEV) // 100
    cfg = PolicyLossConfig(loss=loss, aggregation=agg, beta=0.04, entropy_coef=0.001, top_entropy_fraction=top,
                           normalizer=2000.0 if agg == "constant" else None)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    l64, s64, lp64, en64 = ref.fused_linear_policy_loss(x64, w64, t, old.double(), adv.double(), lw.double(),
                                                        ref_logp=reflp.double(), seq_index=seq, config=cfg)
    l64.backward()
    # the bf16 anchor: materialized bf16 logits, then the same loss (entropy selection shared with ref64)
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    tlp, ten = _torch_lle(xt, wt, t, None, 1.0)
    emask = None
    if top is not None:
        emask = ref.entropy_mask(en64.detach().float(), (lw != 0) & (t != -100), top)
    lt, _ = ref.policy_loss(tlp, old, adv, lw, ref_logp=reflp, seq_index=seq, config=cfg, entropy=ten,
                            entropy_mask=emask)
    lt.backward()
    out = fused_linear_policy_loss_fwd_bwd(
        x, w, t, old, adv, lw, reflp, None, seq, None, cfg.loss_code, cfg.eps_low, cfg.eps_high, 0.0, 0.0,
        cfg.beta, cfg.kl_code, cfg.entropy_coef, cfg.aggregation_code, cfg.normalizer or 0.0, cfg.sapo_tau_pos,
        cfg.sapo_tau_neg, top or 0.0, None, 1.0, -100, True, True, False)
    loss, stats, lp, en, dx, dw, _ = out
    _rule(loss, lt.detach(), l64.detach(), 2, "loss", atol_rel=1e-4)
    _rule(lp, tlp.detach(), lp64.detach(), 2, "logp")
    _rule(dx, xt.grad, x64.grad, 3, "dhidden")
    _rule(dw, wt.grad, w64.grad, 3, "dweight")


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
        l32, s32, gl, _ = policy_loss_fwd_bwd(lp.float(), old.float(), adv.float(), w.float(), None, None, seq,
                                              None, None, cfg.loss_code, cfg.eps_low, cfg.eps_high, 0.0, 3.0, 0.0,
                                              cfg.kl_code, 0.0, cfg.aggregation_code, 0.0, 1.0, 1.05)
        assert abs(l32.item() - l64.item()) <= 1e-5 * max(1.0, abs(l64.item()))
        assert _err(gl, lpr.grad) <= 1e-5 * max(1e-6, lpr.grad.abs().max().item()) + 1e-9
        assert _err(s32, torch.stack([s.double() for s in s64])) <= 1e-5
