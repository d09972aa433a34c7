"""CUDA C++ ops (backend ``cuda``) against the float64 reference, on a GPU. Skipped without CUDA or
without the CUDA build of the extension; run by bench/gpu_check.sh."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rubric_fast import ops
from rubric_fast import reference as R
from rubric_fast.reference.policy_loss import policy_loss_with_grads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in ops.available_backends(),
                       reason="needs a CUDA device and the CUDA build of rubric_fast._C"),
]


@pytest.fixture(autouse=True)
def _cuda_backend():
    with ops.use_backend("cuda"):
        yield


def _err(a, b):
    return float((a.double().cpu() - b.double().cpu()).abs().max()) if a.numel() else 0.0


@pytest.mark.parametrize("n,v", [(1, 7), (333, 1001), (4099, 32003)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprob_entropy_cuda(n, v, dtype):
    h = 64
    x = torch.randn(n, h, dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64) / math.sqrt(h)
    t = torch.randint(0, v, (n,))
    t[::7] = -100
    xd, wd = x.to(dtype), w.to(dtype)
    rl, re, _ = R.linear_logprob_entropy_materialized(xd.double(), wd.double(), t, temperature=0.8)
    # the error-ratio rule: compare with torch in the same dtype on the same device
    tl, te, _ = R.linear_logprob_entropy_materialized(xd.cuda().float(), wd.cuda().float(), t.cuda(), temperature=0.8)
    xg = xd.cuda().requires_grad_(True)
    lp, ent, _ = ops.linear_logprob_entropy(xg, wd.cuda(), t.cuda(), temperature=0.8)
    assert not torch.isnan(lp).any() and not torch.isnan(ent).any()
    assert _err(lp, rl) <= 2 * _err(tl, rl) + 1e-5
    assert _err(ent, re) <= 2 * _err(te, re) + 1e-5
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("loss,agg", list(itertools.product(R.LOSSES, R.AGGREGATIONS)))
def test_policy_loss_cuda(loss, agg):
    n = 5003
    lp = -torch.rand(n, dtype=torch.float64) * 3
    old = lp + 0.3 * torch.randn(n, dtype=torch.float64)
    adv, w = torch.randn(n, dtype=torch.float64), (torch.rand(n) > 0.2).double()
    ref, ent = lp + 0.1 * torch.randn(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    seq = torch.arange(n) // 97
    cfg = R.PolicyLossConfig(loss=loss, aggregation=agg, beta=0.05, entropy_coef=0.01,
                             normalizer=8000.0 if agg == "constant" else None)
    a = lp.clone().requires_grad_(True)
    want, _ = R.policy_loss(a, old, adv, w, ref_logp=ref, seq_index=seq, config=cfg, entropy=ent)
    g_want = torch.autograd.grad(want, a)[0]
    b = lp.float().cuda().requires_grad_(True)
    got, _ = ops.policy_loss(b, old.float().cuda(), adv.float().cuda(), w.float().cuda(), ref_logp=ref.float().cuda(),
                             seq_index=seq.cuda(), config=cfg, entropy=ent.float().cuda())
    got.backward()
    assert abs(got.item() - want.item()) <= 1e-4 * max(1.0, abs(want.item()))
    assert _err(b.grad, g_want) <= 1e-6 + 1e-4 * float(g_want.abs().max())


@pytest.mark.parametrize("loss,agg", [("ppo_clip", "token_mean"), ("gspo", "seq_mean_token_mean"),
                                      ("sapo", "constant"), ("cispo", "seq_mean_token_sum")])
def test_policy_loss_native_cuda_takes_the_packed_config(loss, agg):
    # The native op straight, with PolicyLossConfig.to_op_args(): independent of the Python ops layer.
    n = 3001
    lp = -torch.rand(n, dtype=torch.float64) * 3
    old = lp + 0.3 * torch.randn(n, dtype=torch.float64)
    adv, w = torch.randn(n, dtype=torch.float64), (torch.rand(n) > 0.2).double()
    ref = lp + 0.1 * torch.randn(n, dtype=torch.float64)
    seq = torch.arange(n) // 89
    cfg = R.PolicyLossConfig(loss=loss, aggregation=agg, beta=0.05, kl="k2", dual_clip=3.0, delta=1.5,
                             normalizer=5000.0 if agg == "constant" else None)
    want, _, g_want, _ = policy_loss_with_grads(lp, old, adv, w, ref_logp=ref, seq_index=seq, config=cfg)
    got, stats, g_got, _ = torch.ops.rubric_fast.policy_loss_native(
        lp.cuda(), old.cuda(), adv.cuda(), w.cuda(), ref.cuda(), None, seq.cuda(), None, None, *cfg.to_op_args())
    assert got.dtype == torch.float64 and stats.shape == (4,)
    assert abs(got.item() - want.item()) <= 1e-10 * max(1.0, abs(want.item()))
    assert _err(g_got, g_want) <= 1e-12
    f, i = cfg.to_op_args()
    with pytest.raises(RuntimeError, match=r"iparams\[0\] \(loss\)"):
        torch.ops.rubric_fast.policy_loss_native(lp.cuda(), old.cuda(), adv.cuda(), w.cuda(), None, None,
                                                 seq.cuda(), None, None, f, [9, i[1], i[2]])


@pytest.mark.parametrize("estimator", R.ESTIMATORS)
def test_group_advantages_cuda(estimator):
    r = torch.rand(777, dtype=torch.float64)
    r[::13] = float("nan")
    g = torch.randint(0, 100, (777,)) * 3
    m = torch.rand(777, dtype=torch.float64)
    want, wv = R.group_advantages(r, g, estimator=estimator, metric=m)
    got, gv = ops.group_advantages(r.cuda(), g.cuda(), estimator=estimator, metric=m.cuda())
    assert torch.equal(gv.cpu(), wv) and _err(got, want) < 1e-9


@pytest.mark.parametrize("n", [1, 1000, 70001])
def test_entropy_mask_cuda(n):
    e = torch.randint(0, 50, (n,)).float() / 7  # ties
    valid = torch.rand(n) > 0.3
    got = ops.entropy_mask(e.cuda(), valid.cuda(), 0.2)
    assert torch.equal(got.cpu(), R.entropy_mask(e, valid, 0.2))
