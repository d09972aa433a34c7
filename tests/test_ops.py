"""The public ops against the float64 reference, on every backend that runs on the CPU here.

Fresh random inputs each test (the seed is printed on failure through the test id), odd shapes,
N = 0, opcheck of every registered op, and torch.compile(fullgraph=True) without graph breaks.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from rubric_fast import ops
from rubric_fast import reference as R

CPU_BACKENDS = [b for b in ops.available_backends() if b in ("torch", "cpu")]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    with ops.use_backend(request.param):
        yield request.param


def _seed():
    s = random.randrange(1 << 30)
    torch.manual_seed(s)
    return s


def _lle_inputs(n, h, v, dtype=torch.float64, bias=True, ignore_some=True):
    x = torch.randn(n, h, dtype=dtype)
    w = torch.randn(v, h, dtype=dtype) / math.sqrt(h)
    b = torch.randn(v, dtype=dtype) if bias else None
    t = torch.randint(0, v, (n,))
    if ignore_some and n > 2:
        t[torch.randperm(n)[: n // 3]] = -100
    return x, w, b, t


@pytest.mark.parametrize("n,h,v", [(0, 8, 5), (1, 3, 2), (7, 5, 37), (33, 16, 130)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprob_entropy_matches_materialized(backend, n, h, v, temperature):
    seed = _seed()
    x, w, b, t = _lle_inputs(n, h, v)
    x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    logp, ent, lse = ops.linear_logprob_entropy(x, w, t, bias=b, temperature=temperature)
    rl, re, rs = R.linear_logprob_entropy_materialized(x, w, t, bias=b, temperature=temperature)
    for got, ref in ((logp, rl), (ent, re), (lse, rs)):
        assert got.dtype == torch.float64 and not torch.isnan(got).any(), seed
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=f"seed {seed}")
    if n == 0:
        return
    g1, g2 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    grads = torch.autograd.grad((logp * g1).sum() + (ent * g2).sum(), (x, w, b))
    ref_grads = torch.autograd.grad((rl * g1).sum() + (re * g2).sum(), (x, w, b))
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10, msg=f"seed {seed}")


def test_linear_logprob_entropy_low_precision_inputs_give_fp32(backend):
    x, w, b, t = _lle_inputs(9, 16, 50, dtype=torch.bfloat16)
    logp, ent, lse = ops.linear_logprob_entropy(x, w, t, bias=b)
    assert logp.dtype == ent.dtype == lse.dtype == torch.float32
    rl, re, _ = R.linear_logprob_entropy_materialized(x.double(), w.double(), t, bias=b.double())
    assert (logp.double() - rl).abs().max() < 1e-4
    assert (ent.double() - re).abs().max() < 1e-4


def test_linear_logprob_entropy_huge_logits_are_finite(backend):
    x = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    w = torch.tensor([[1e4], [-1e4], [0.0]], dtype=torch.float64)
    logp, ent, lse = ops.linear_logprob_entropy(x, w, torch.tensor([1, 1]))
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(lse).all()
    assert logp[0].item() == pytest.approx(-2e4) and logp[1].item() == pytest.approx(0.0, abs=1e-12)


def test_linear_logprob_entropy_no_weight_grad_when_frozen(backend):
    x, w, b, t = _lle_inputs(11, 6, 23, bias=False)
    x.requires_grad_(True)
    logp, ent, _ = ops.linear_logprob_entropy(x, w, t)
    (logp.sum() + ent.sum()).backward()
    assert w.grad is None and x.grad is not None and torch.isfinite(x.grad).all()


def _policy_inputs(n, dtype=torch.float64, n_seq=4):
    lp = -torch.rand(n, dtype=dtype) * 3
    old = lp + 0.4 * torch.randn(n, dtype=dtype)
    adv = torch.randn(n, dtype=dtype)
    w = (torch.rand(n) > 0.2).to(dtype)
    ref = lp + 0.2 * torch.randn(n, dtype=dtype)
    isw = torch.rand(n, dtype=dtype) + 0.5
    ent = torch.rand(n, dtype=dtype) * 2
    seq = torch.sort(torch.randint(0, n_seq, (n,)) * 7 + 3).values  # arbitrary, non-contiguous ids
    return lp, old, adv, w, ref, isw, ent, seq


LOSS_CASES = list(itertools.product(R.LOSSES, R.AGGREGATIONS, R.KL_ESTIMATORS))


@pytest.mark.parametrize("loss,aggregation,kl", LOSS_CASES)
def test_policy_loss_matches_reference_autograd(backend, loss, aggregation, kl):
    seed = _seed()
    n = 29
    lp, old, adv, w, ref, isw, ent, seq = _policy_inputs(n)
    extra = {"delta": 1.6, "dual_clip": 3.0} if loss in ("ppo_clip", "gspo") else {}
    cfg = R.PolicyLossConfig(loss=loss, aggregation=aggregation, kl=kl, beta=0.05, entropy_coef=0.01,
                             eps_high=0.28, normalizer=64.0 if aggregation == "constant" else None, **extra)
    emask = torch.rand(n) > 0.3
    a = lp.clone().requires_grad_(True)
    e = ent.clone().requires_grad_(True)
    got, stats = ops.policy_loss(a, old, adv, w, ref_logp=ref, is_weight=isw, seq_index=seq, config=cfg, entropy=e,
                                 entropy_mask=emask)
    g_got = torch.autograd.grad(got, (a, e))
    b_ = lp.clone().requires_grad_(True)
    f = ent.clone().requires_grad_(True)
    want, rstats = R.policy_loss(b_, old, adv, w, ref_logp=ref, is_weight=isw, seq_index=seq, config=cfg, entropy=f,
                                 entropy_mask=emask)
    g_want = torch.autograd.grad(want, (b_, f))
    assert not torch.isnan(got), seed
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"seed {seed}")
    for x, y in zip(g_got, g_want):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12, msg=f"seed {seed}")
    for x, y in zip(stats, rstats):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-5, atol=1e-6, msg=f"seed {seed}")


def test_policy_loss_empty_is_zero(backend):
    z = torch.zeros(0)
    for agg in R.AGGREGATIONS:
        cfg = R.PolicyLossConfig(aggregation=agg, normalizer=4.0 if agg == "constant" else None)
        lp = z.clone().requires_grad_(True)
        loss, stats = ops.policy_loss(lp, z, z, z, seq_index=torch.zeros(0, dtype=torch.long), config=cfg)
        assert loss.item() == 0.0 and all(not torch.isnan(s) for s in stats)
        loss.backward()
        assert lp.grad.shape == (0,)


@pytest.mark.parametrize("loss", R.LOSSES)
@pytest.mark.parametrize("top", [None, 0.35])
def test_fused_linear_policy_loss_matches_reference(backend, loss, top):
    seed = _seed()
    n, h, v = 19, 7, 41
    x, w, b, t = _lle_inputs(n, h, v)
    lp0 = R.linear_logprob_entropy_materialized(x, w, t, bias=b)[0]
    old = lp0 + 0.3 * torch.randn(n, dtype=torch.float64)
    adv = torch.randn(n, dtype=torch.float64)
    lw = (t != -100).double()
    seq = torch.arange(n) // 5
    cfg = R.PolicyLossConfig(loss=loss, beta=0.02, entropy_coef=0.01, top_entropy_fraction=top,
                             aggregation="seq_mean_token_mean")
    outs = []
    for fn in (ops.fused_linear_policy_loss, R.fused_linear_policy_loss):
        xx, ww, bb = (p.clone().requires_grad_(True) for p in (x, w, b))
        loss_v, stats, logp, ent = fn(xx, ww, t, old, adv, lw, ref_logp=old, seq_index=seq, config=cfg, bias=bb,
                                      temperature=0.9)
        outs.append((loss_v.detach(), torch.autograd.grad(loss_v, (xx, ww, bb)), logp.detach(), ent.detach()))
    (l1, g1, p1, e1), (l2, g2, p2, e2) = outs
    torch.testing.assert_close(l1, l2, rtol=1e-10, atol=1e-12, msg=f"seed {seed}")
    torch.testing.assert_close(p1, p2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e1, e2, rtol=1e-10, atol=1e-12)
    for a, c in zip(g1, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, c, rtol=1e-8, atol=1e-11, msg=f"seed {seed}")


@pytest.mark.parametrize("estimator", R.ESTIMATORS)
@pytest.mark.parametrize("scale", [None, "group", "batch", "none"])
def test_group_advantages_matches_reference(backend, estimator, scale):
    if estimator == "dr_grpo" and scale not in (None, "none"):
        with pytest.raises(ValueError, match="scale"):
            ops.group_advantages(torch.rand(4), torch.zeros(4, dtype=torch.long), estimator=estimator, scale=scale)
        return
    seed = _seed()
    b = 37
    r = torch.rand(b, dtype=torch.float64)
    r[torch.randperm(b)[:5]] = float("nan")
    g = torch.randint(0, 9, (b,)) * 11  # arbitrary ids, some groups of one
    r[g == g[0]] = 0.5  # an all-equal group
    metric = torch.rand(b, dtype=torch.float64)
    adv, valid = ops.group_advantages(r, g, estimator=estimator, scale=scale, metric=metric)
    radv, rvalid = R.group_advantages(r, g, estimator=estimator, scale=scale, metric=metric)
    assert not torch.isnan(adv).any(), seed
    assert torch.equal(valid, rvalid)
    torch.testing.assert_close(adv, radv, rtol=1e-10, atol=1e-12, msg=f"seed {seed}")
    assert (adv[~valid] == 0).all()
    if estimator != "w_reinforce":  # the only estimator that does not centre within the group
        assert (adv[(g == g[0]) & valid] == 0).all()


@pytest.mark.parametrize("n", [0, 1, 10, 257])
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 1.0])
def test_entropy_mask_exact_count_and_ties(backend, n, fraction):
    ent = torch.randint(0, 5, (n,)).float()  # many ties
    valid = torch.rand(n) > 0.25
    mask = ops.entropy_mask(ent, valid, fraction)
    want = R.entropy_mask(ent, valid, fraction)
    assert torch.equal(mask, want)
    assert int(mask.sum()) == R.selection_count(fraction, int(valid.sum()))
    assert not (mask & ~valid).any()


# ---------------------------------------------------------------------------------------- registration


def test_opcheck_every_op():
    x, w, b, t = _lle_inputs(6, 4, 9)
    lp, old, adv, lw, ref, isw, ent, seq = _policy_inputs(6)
    cfg = R.PolicyLossConfig(loss="gspo", beta=0.1, entropy_coef=0.01, aggregation="seq_mean_token_mean")
    cases = [
        (torch.ops.rubric_fast.linear_logprob_entropy.default,
         (x.requires_grad_(), w.requires_grad_(), t, b.requires_grad_(), 0.8, -100, "torch")),
        (torch.ops.rubric_fast.policy_loss.default,
         (lp.requires_grad_(), old, adv, lw, ref, isw, seq, ent.requires_grad_(), None, *cfg.to_op_args(), "torch")),
        (torch.ops.rubric_fast.fused_linear_policy_loss.default,
         (x, w, t, old, adv, lw, ref, isw, seq, None, b, 0.8, -100, *cfg.replace(top_entropy_fraction=0.5).to_op_args(),
          True, True, True, "torch")),
        (torch.ops.rubric_fast.group_advantages.default,
         (torch.rand(8), torch.tensor([0, 0, 1, 1, 1, 2, 3, 3]), "grpo", "group", 1e-6, 0.1, None, "torch")),
        (torch.ops.rubric_fast.entropy_mask.default, (torch.rand(10), torch.rand(10) > 0.3, 0.4, "torch")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_ops_compile_fullgraph_without_breaks():
    x, w, b, t = _lle_inputs(13, 8, 29, dtype=torch.float32)
    lp0 = R.linear_logprob_entropy_materialized(x, w, t, bias=b)[0]
    old = lp0 + 0.1 * torch.randn(13)
    adv, lw, seq = torch.randn(13), (t != -100).float(), torch.arange(13) // 4
    cfg = R.PolicyLossConfig(loss="ppo_clip", top_entropy_fraction=0.5, aggregation="seq_mean_token_mean")

    def step(x, w, b):
        loss, stats, logp, ent = ops.fused_linear_policy_loss(x, w, t, old, adv, lw, seq_index=seq, config=cfg, bias=b)
        lp2, ent2, _ = ops.linear_logprob_entropy(x, w, t, bias=b)
        l2, _ = ops.policy_loss(lp2, old, adv, lw, config=R.PolicyLossConfig(entropy_coef=0.1), entropy=ent2)
        a, v = ops.group_advantages(adv, seq)
        m = ops.entropy_mask(ent, lw > 0, 0.3)
        return loss + l2 + a.sum() + m.float().sum() + stats.ratio_mean

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    params = [p.clone().requires_grad_(True) for p in (x, w, b)]
    out = compiled(*params)
    out.backward()
    ref_params = [p.clone().requires_grad_(True) for p in (x, w, b)]
    ref_out = step(*ref_params)
    ref_out.backward()
    torch.testing.assert_close(out, ref_out)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.grad, q.grad)
    explained = torch._dynamo.explain(step)(*ref_params)
    assert explained.graph_break_count == 0


# ---------------------------------------------------------------------------------------- input checks


def test_bad_inputs_name_the_argument():
    x, w, b, t = _lle_inputs(5, 4, 7, dtype=torch.float32)
    with pytest.raises(ValueError, match="weight"):
        ops.linear_logprob_entropy(x, w[:, :3], t)
    with pytest.raises(ValueError, match="targets"):
        ops.linear_logprob_entropy(x, w, t[:4])
    with pytest.raises(TypeError, match="targets"):
        ops.linear_logprob_entropy(x, w, t.float())
    with pytest.raises((ValueError, RuntimeError), match="targets"):  # raised inside the kernel
        ops.linear_logprob_entropy(x, w, torch.tensor([0, 1, 2, 3, 7]))
    with pytest.raises(ValueError, match="bias"):
        ops.linear_logprob_entropy(x, w, t, bias=torch.zeros(6))
    with pytest.raises(ValueError, match="temperature"):
        ops.linear_logprob_entropy(x, w, t, temperature=0.0)
    z = torch.zeros(5)
    with pytest.raises(ValueError, match="advantages"):
        ops.policy_loss(z, z, torch.zeros(4), z, config=R.PolicyLossConfig())
    with pytest.raises(ValueError, match="seq_index"):
        ops.policy_loss(z, z, z, z, config=R.PolicyLossConfig(loss="gspo"))
    with pytest.raises(ValueError, match="ref_logp"):
        ops.policy_loss(z, z, z, z, config=R.PolicyLossConfig(beta=0.1))
    with pytest.raises(ValueError, match="entropy"):
        ops.policy_loss(z, z, z, z, config=R.PolicyLossConfig(entropy_coef=0.1))
    with pytest.raises(TypeError, match="config"):
        ops.policy_loss(z, z, z, z, config={"loss": "ppo_clip"})
    with pytest.raises(ValueError, match="estimator"):
        ops.group_advantages(z, torch.zeros(5, dtype=torch.long), estimator="ppo")
    with pytest.raises(ValueError, match="metric"):
        ops.group_advantages(z, torch.zeros(5, dtype=torch.long), estimator="canon")
    with pytest.raises(ValueError, match="valid"):
        ops.entropy_mask(z, torch.ones(5), 0.5)
    with pytest.raises(ValueError, match="top_fraction"):
        ops.entropy_mask(z, torch.ones(5, dtype=torch.bool), 1.5)
    with pytest.raises(ValueError, match="use_backend"):
        ops.use_backend("tpu")


def test_forced_backend_that_cannot_run_falls_back(caplog):
    with ops.use_backend("cuda"):
        x, w, b, t = _lle_inputs(4, 3, 5)
        with caplog.at_level("WARNING", logger="rubric_fast"):
            logp, _, _ = ops.linear_logprob_entropy(x, w, t)
        assert "cannot run" in caplog.text
    torch.testing.assert_close(logp, R.linear_logprob_entropy_materialized(x, w, t)[0])
    assert ops.current_backend() is None
    assert "torch" in ops.available_backends()


def test_fused_on_policy_old_logp_none_equals_explicit_old(backend):
    x, w, b, t = _lle_inputs(15, 6, 23)
    adv, lw = torch.randn(15, dtype=torch.float64), (t != -100).double()
    cfg = R.PolicyLossConfig(loss="ppo_clip", beta=0.05)
    ref_lp = R.linear_logprob_entropy_materialized(x, w, t)[0] + 0.1
    a = x.clone().requires_grad_(True)
    loss, stats, logp, _ = ops.fused_linear_policy_loss(a, w, t, None, adv, lw, ref_logp=ref_lp, config=cfg)
    loss.backward()
    c = x.clone().requires_grad_(True)
    loss2, _, _, _ = ops.fused_linear_policy_loss(c, w, t, logp, adv, lw, ref_logp=ref_lp, config=cfg)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(a.grad, c.grad)
    assert stats.ratio_mean.item() == pytest.approx(1.0)


def test_fused_backward_scales_in_place_and_refuses_a_second_backward():
    """The fused op's gradients are computed in the forward; its backward scales them in place (no second
    dW-sized buffer). A second backward through the same graph is refused loudly, never wrong."""
    x, w, b, t = _lle_inputs(9, 8, 31, dtype=torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    adv, lw = torch.randn(9), (t != -100).float()
    cfg = R.PolicyLossConfig()
    loss, *_ = ops.fused_linear_policy_loss(x, w, t, None, adv, lw, config=cfg)
    (3.0 * loss).backward(retain_graph=True)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref_loss, *_ = R.fused_linear_policy_loss(xr, wr, t, None, adv.double(), lw.double(), config=cfg)
    (3.0 * ref_loss).backward()
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()
