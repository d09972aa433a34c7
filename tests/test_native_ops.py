"""The C++ CPU ops of rubric_fast._C (torch.ops.rubric_fast.*_native) against the float64 reference.

The oracle is rubric_fast/reference (docs/ops-math.md). Inputs are random and fresh in every test, sizes
are odd (N in {0, 1, 7, 1023}); fp64 inputs must match the reference to 1e-10, fp32 to ~1e-5.
Skipped when the extension is not built, unless RUBRIC_FAST_REQUIRE_NATIVE=1 (then a missing build fails).
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from rubric_fast import _native
from rubric_fast.reference import (
    PolicyLossConfig,
    group_advantages,
    linear_logprob_entropy_materialized,
    policy_loss,
    topk_mask,
)
from rubric_fast.reference.policy_loss import policy_loss_with_grads
from rubric_fast.reference.types import FPARAMS, IPARAMS

if os.environ.get("RUBRIC_FAST_REQUIRE_NATIVE") == "1":
    assert _native.CPU_AVAILABLE, f"rubric_fast._C is required but not loaded: {_native.load_error}"
pytestmark = pytest.mark.skipif(not _native.CPU_AVAILABLE, reason=f"rubric_fast._C not built: {_native.load_error}")

ops = torch.ops.rubric_fast
SIZES = (0, 1, 7, 1023)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _close(actual, expected, dtype, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN in the native result"
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------- group_advantages

ESTIMATOR_SCALES = [(e, s) for e in ("grpo", "dr_grpo", "rloo", "w_reinforce", "canon")
                    for s in ("group", "batch", "none") if not (e == "dr_grpo" and s != "none")]


def _rollouts(b, dtype):
    # ~8 per group, ids arbitrary and unsorted, some groups of one, ~15% missing rewards.
    n_groups = max(1, b // 8)
    ids = torch.randint(0, n_groups, (b,)) * 7919 - 1000
    if b > 2:
        ids[0] = 10**12  # a group of one
    rewards = torch.rand(b, dtype=torch.float64).round(decimals=1)  # ties within a group
    rewards[torch.rand(b) < 0.15] = float("nan")
    metric = torch.randint(0, 5, (b,)).to(dtype)  # ties at the median
    return rewards.to(dtype), ids, metric


@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("estimator,scale", ESTIMATOR_SCALES)
def test_group_advantages_matches_reference(estimator, scale, dtype, b):
    rewards, ids, metric = _rollouts(b, dtype)
    pw = float(torch.rand(()))
    adv, valid = ops.group_advantages_native(rewards, ids, estimator, scale, 1e-6, pw, metric)
    ref_adv, ref_valid = group_advantages(rewards, ids, estimator=estimator, scale=scale, eps=1e-6,
                                          positive_weight=pw, metric=metric)
    assert adv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert valid.dtype == torch.bool and torch.equal(valid, ref_valid)
    _close(adv, ref_adv, dtype, f"{estimator}/{scale} advantages")
    assert (adv[~valid] == 0).all()


def test_group_advantages_group_of_one_and_equal_rewards_are_zero():
    rewards = torch.tensor([0.5, 0.7, 0.7, 0.7, float("nan"), 0.3])
    ids = torch.tensor([3, 9, 9, 9, 4, 4])  # group 3: one member; group 9: equal; group 4: one valid
    for est in ("grpo", "rloo", "canon"):
        adv, valid = ops.group_advantages_native(rewards, ids, est, "group", 0.0, 1.0, torch.zeros(6))
        assert torch.equal(adv, torch.zeros(6)), est
        assert valid.tolist() == [True, True, True, True, False, True]


def test_group_advantages_bad_inputs_name_the_argument():
    r, g = torch.rand(5), torch.arange(5)
    with pytest.raises(RuntimeError, match="estimator"):
        ops.group_advantages_native(r, g, "ppo", "group", 1e-6, 1.0, None)
    with pytest.raises(RuntimeError, match="scale"):
        ops.group_advantages_native(r, g, "grpo", "global", 1e-6, 1.0, None)
    with pytest.raises(RuntimeError, match="group_index"):
        ops.group_advantages_native(r, g[:4], "grpo", "group", 1e-6, 1.0, None)
    with pytest.raises(RuntimeError, match="group_index"):
        ops.group_advantages_native(r, g.int(), "grpo", "group", 1e-6, 1.0, None)
    with pytest.raises(RuntimeError, match="metric"):
        ops.group_advantages_native(r, g, "canon", "group", 1e-6, 1.0, None)
    with pytest.raises(RuntimeError, match="dr_grpo"):
        ops.group_advantages_native(r, g, "dr_grpo", "group", 1e-6, 1.0, None)
    with pytest.raises(RuntimeError, match="rewards"):
        ops.group_advantages_native(torch.arange(5), g, "grpo", "group", 1e-6, 1.0, None)


# ----------------------------------------------------------------------------------------------- entropy_mask

@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_entropy_mask_matches_reference_with_ties(n, dtype):
    entropy = (torch.rand(n) * 4).round(decimals=1).to(dtype)  # many ties
    if n > 3:
        entropy[1] = -0.0  # ties with +0.0
        entropy[2] = 0.0
    valid = torch.rand(n) < 0.8
    n_valid = int(valid.sum())
    for k in sorted({0, 1, n_valid // 3, n_valid // 2, n_valid} - {-1}):
        if k > n_valid:
            continue
        got = ops.entropy_mask_native(entropy, valid, k)
        assert got.dtype == torch.bool and int(got.sum()) == k
        assert torch.equal(got, topk_mask(entropy, valid, k)), f"k={k}"


def test_entropy_mask_bad_inputs_name_the_argument():
    e, v = torch.rand(6), torch.ones(6, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="'k'"):
        ops.entropy_mask_native(e, v, 7)
    with pytest.raises(RuntimeError, match="'k'"):
        ops.entropy_mask_native(e, v, -1)
    with pytest.raises(RuntimeError, match="valid"):
        ops.entropy_mask_native(e, v.float(), 2)
    with pytest.raises(RuntimeError, match="valid"):
        ops.entropy_mask_native(e, v[:5], 2)
    with pytest.raises(RuntimeError, match="entropy"):
        ops.entropy_mask_native(torch.tensor([1.0, float("nan")]), torch.ones(2, dtype=torch.bool), 1)


# ----------------------------------------------------------------------------------------------- policy_loss

def _tokens(n, dtype, n_seqs=None):
    g = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    logp = -g(n).abs() - 0.1
    old_logp = logp + 0.3 * g(n)  # ratios well outside the clip range too
    adv = g(n)
    w = (torch.rand(n) < 0.85).double() * torch.rand(n).add(0.5)  # weights with zeros
    ref = logp + 0.2 * g(n)
    isw = torch.rand(n, dtype=torch.float64) * 2
    seq = torch.randint(0, max(1, (n_seqs or max(1, n // 5))), (n,)) * 13 + 5
    ent = g(n).abs()
    emask = torch.rand(n) < 0.7
    cast = lambda t: t.to(dtype)  # noqa: E731
    return dict(logp=cast(logp), old_logp=cast(old_logp), advantages=cast(adv), loss_weight=cast(w),
                ref_logp=cast(ref), is_weight=cast(isw), seq_index=seq, entropy=cast(ent), entropy_mask=emask)


def _native_policy_loss(t, cfg, **drop):
    args = {k: (None if drop.get(k) else v) for k, v in t.items()}
    return ops.policy_loss_native(args["logp"], args["old_logp"], args["advantages"], args["loss_weight"],
                                  args["ref_logp"], args["is_weight"], args["seq_index"], args["entropy"],
                                  args["entropy_mask"], *cfg.to_op_args())


def _check_policy_loss(t, cfg, dtype, **drop):
    loss, stats, g_lp, g_ent = _native_policy_loss(t, cfg, **drop)
    kw = {k: (None if drop.get(k) else t[k]) for k in ("ref_logp", "is_weight", "seq_index", "entropy",
                                                       "entropy_mask")}
    ref_loss, ref_stats, ref_glp, ref_gent = policy_loss_with_grads(
        t["logp"], t["old_logp"], t["advantages"], t["loss_weight"], config=cfg, **kw)
    out_dt = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == out_dt and g_lp.dtype == out_dt and g_ent.dtype == out_dt
    assert stats.shape == (4,) and stats.dtype == torch.float32
    _close(loss, ref_loss, dtype, f"{cfg} loss")
    _close(g_lp, ref_glp, dtype, f"{cfg} grad_logp")
    _close(g_ent, ref_gent, dtype, f"{cfg} grad_entropy")
    torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-6)
    return loss, g_lp, g_ent


LOSS_AGG_KL = list(itertools.product(("ppo_clip", "cispo", "sapo", "gspo"),
                                     ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"),
                                     ("k1", "k2", "k3")))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss,aggregation,kl", LOSS_AGG_KL)
def test_policy_loss_every_combination_matches_reference(loss, aggregation, kl, dtype):
    n = int(torch.randint(50, 400, ()))
    t = _tokens(n, dtype)
    normalizer = float(n) * 1.5 if aggregation == "constant" else None
    cfg = PolicyLossConfig(loss=loss, aggregation=aggregation, kl=kl, beta=0.05, entropy_coef=0.01,
                           eps_low=0.2, eps_high=0.28, normalizer=normalizer)
    _check_policy_loss(t, cfg, dtype)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ["plain", "delta", "dual_clip", "normalizer", "no_optionals"])
@pytest.mark.parametrize("loss", ["ppo_clip", "gspo", "cispo", "sapo"])
def test_policy_loss_variants_and_sizes(loss, variant, dtype, n):
    t = _tokens(n, dtype)
    kw = dict(loss=loss, beta=0.1, entropy_coef=0.02, aggregation="seq_mean_token_mean" if loss == "gspo"
              else "token_mean")
    drop = {}
    if variant == "delta":
        kw["delta"] = 1.5
    elif variant == "dual_clip":
        kw["dual_clip"] = 2.0
    elif variant == "normalizer":
        kw["normalizer"] = 37.0
    elif variant == "no_optionals":
        kw.update(beta=0.0, entropy_coef=0.0)
        drop = dict(ref_logp=True, is_weight=True, entropy=True, entropy_mask=True,
                    seq_index=loss != "gspo")
        kw["aggregation"] = "token_mean"
    cfg = PolicyLossConfig(**kw)
    loss_v, g_lp, g_ent = _check_policy_loss(t, cfg, dtype, **drop)
    if n == 0:
        assert float(loss_v) == 0.0 and g_lp.shape == (0,)
    if drop.get("entropy"):
        assert (g_ent == 0).all()


def test_policy_loss_gradients_match_autograd_of_the_reference():
    # An oracle independent of the closed-form gradients: autograd through the reference loss.
    t = _tokens(301, torch.float64)
    for loss, agg in itertools.product(("ppo_clip", "gspo", "cispo", "sapo"), ("token_mean", "seq_mean_token_mean")):
        cfg = PolicyLossConfig(loss=loss, aggregation=agg, beta=0.1, kl="k3", entropy_coef=0.03, dual_clip=3.0)
        _, _, g_lp, g_ent = _native_policy_loss(t, cfg)
        lp = t["logp"].clone().requires_grad_(True)
        ent = t["entropy"].clone().requires_grad_(True)
        ref_loss, _ = policy_loss(lp, t["old_logp"], t["advantages"], t["loss_weight"], ref_logp=t["ref_logp"],
                                  is_weight=t["is_weight"], seq_index=t["seq_index"], config=cfg, entropy=ent,
                                  entropy_mask=t["entropy_mask"])
        d_lp, d_ent = torch.autograd.grad(ref_loss, (lp, ent))
        _close(g_lp, d_lp, torch.float64, f"{loss}/{agg} grad_logp vs autograd")
        _close(g_ent, d_ent, torch.float64, f"{loss}/{agg} grad_entropy vs autograd")


def test_policy_loss_all_zero_weights_gives_zero_not_nan():
    t = _tokens(9, torch.float32)
    t["loss_weight"] = torch.zeros(9)
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        loss, stats, g_lp, g_ent = _native_policy_loss(t, PolicyLossConfig(loss="gspo", aggregation=agg))
        assert float(loss) == 0.0 and not stats.isnan().any() and (g_lp == 0).all() and (g_ent == 0).all()


def test_policy_loss_bad_inputs_name_the_argument():
    t = _tokens(8, torch.float32)
    cfg = PolicyLossConfig(loss="gspo")
    with pytest.raises(RuntimeError, match="seq_index"):
        _native_policy_loss(t, cfg, seq_index=True)
    with pytest.raises(RuntimeError, match="seq_index"):
        _native_policy_loss(t, PolicyLossConfig(aggregation="seq_mean_token_sum"), seq_index=True)
    bad = dict(t, old_logp=t["old_logp"][:7])
    with pytest.raises(RuntimeError, match="old_logp"):
        _native_policy_loss(bad, cfg)
    bad = dict(t, advantages=t["advantages"].long())
    with pytest.raises(RuntimeError, match="advantages"):
        _native_policy_loss(bad, cfg)
    bad = dict(t, seq_index=t["seq_index"].int())
    with pytest.raises(RuntimeError, match="seq_index"):
        _native_policy_loss(bad, cfg)



def _packed(fparams, iparams, t=None):
    t = _tokens(8, torch.float32) if t is None else t
    return ops.policy_loss_native(t["logp"], t["old_logp"], t["advantages"], t["loss_weight"], None, None,
                                  t["seq_index"], None, None, fparams, iparams)


def test_policy_loss_packed_layout_matches_the_python_field_lists():
    # policy_params.h mirrors FPARAMS / IPARAMS. Each config differs from the default in one field and the
    # native result must match the reference for each, so a field read from the wrong position shows up.
    assert len(FPARAMS) == 10 and len(IPARAMS) == 3
    f, i = PolicyLossConfig().to_op_args()
    assert len(f) == len(FPARAMS) and len(i) == len(IPARAMS)
    t = _tokens(211, torch.float64)
    cfgs = [PolicyLossConfig(), PolicyLossConfig(eps_low=0.05), PolicyLossConfig(eps_high=0.01),
            PolicyLossConfig(delta=1.25), PolicyLossConfig(dual_clip=1.5), PolicyLossConfig(beta=0.3),
            PolicyLossConfig(entropy_coef=0.2), PolicyLossConfig(normalizer=17.0),
            PolicyLossConfig(loss="sapo", sapo_tau_pos=0.3), PolicyLossConfig(loss="sapo", sapo_tau_neg=3.0),
            PolicyLossConfig(top_entropy_fraction=0.5), PolicyLossConfig(loss="cispo"), PolicyLossConfig(kl="k1"),
            PolicyLossConfig(aggregation="seq_mean_token_sum")]
    for cfg in cfgs:
        _check_policy_loss(t, cfg, torch.float64)


@pytest.mark.parametrize("fparams,iparams,field", [
    ([0.2] * 9, [0, 2, 0], r"argument 'fparams' must have 10 values"),
    ([0.2] * 11, [0, 2, 0], r"argument 'fparams' must have 10 values"),
    (None, [0, 2], r"argument 'iparams' must have 3 values"),
    (None, [0, 2, 0, 0], r"argument 'iparams' must have 3 values"),
    (None, [7, 2, 0], r"iparams\[0\] \(loss\) must be 0 \(ppo_clip\)"),
    (None, [-1, 2, 0], r"iparams\[0\] \(loss\)"),
    (None, [0, 3, 0], r"iparams\[1\] \(kl\) must be 0 \(k1\)"),
    (None, [0, 2, 4], r"iparams\[2\] \(aggregation\) must be 0 \(token_mean\)"),
    ({0: 1.0}, None, r"fparams\[0\] \(eps_low\) must be in \[0, 1\)"),
    ({0: float("nan")}, None, r"fparams\[0\] \(eps_low\) must be a finite number"),
    ({1: -0.1}, None, r"fparams\[1\] \(eps_high\) must be >= 0"),
    ({2: 1.1}, None, r"fparams\[2\] \(delta\) must be > 1 \+ eps_high"),
    ({2: float("nan")}, None, r"fparams\[2\] \(delta\)"),
    ({3: 0.5}, None, r"fparams\[3\] \(dual_clip\) must be > 1"),
    ({4: -1.0}, None, r"fparams\[4\] \(beta\) must be >= 0"),
    ({5: float("inf")}, None, r"fparams\[5\] \(entropy_coef\) must be a finite number"),
    ({6: float("inf")}, None, r"fparams\[6\] \(normalizer\)"),
    ({7: 0.0}, None, r"fparams\[7\] \(sapo_tau_pos\) must be > 0"),
    ({8: -1.0}, None, r"fparams\[8\] \(sapo_tau_neg\) must be > 0"),
    ({9: 1.5}, None, r"fparams\[9\] \(top_entropy_fraction\) must be in \(0, 1\]"),
    (None, [0, 2, 3], r"fparams\[6\] \(normalizer\) must be > 0 with aggregation=constant"),
])
def test_policy_loss_bad_packed_config_names_the_field(fparams, iparams, field):
    f, i = PolicyLossConfig().to_op_args()
    if isinstance(fparams, dict):
        f = [fparams.get(k, v) for k, v in enumerate(f)]
    elif fparams is not None:
        f = fparams
    i = i if iparams is None else iparams
    with pytest.raises(RuntimeError, match=r"policy_loss_native: " + field):
        _packed(f, i)
    # The Meta kernel checks the same way (torch.compile fails at trace time, not at the launch).
    t = _tokens(8, torch.float32)
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    with pytest.raises(RuntimeError, match=r"policy_loss_native: " + field):
        ops.policy_loss_native(meta["logp"], meta["old_logp"], meta["advantages"], meta["loss_weight"], None,
                               None, meta["seq_index"], None, None, f, i)


def test_policy_loss_unset_optionals_and_top_entropy_fraction_are_accepted():
    # -1 (to_op_args' "not set") and any value <= 0 read as not set, like PolicyLossConfig.from_op_args;
    # top_entropy_fraction is carried but does not change the native loss (the mask arrives as a tensor).
    f, i = PolicyLossConfig().to_op_args()
    t = _tokens(101, torch.float64)
    base = _packed(f, i, t)
    for idx, value in ((2, 0.0), (3, 0.0), (6, 0.0), (9, 0.0), (2, -5.0), (9, 0.3)):
        f2 = list(f)
        f2[idx] = value
        for got, want in zip(_packed(f2, i, t), base):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- linear_logprob_entropy

def _lle_inputs(n, v, h, dtype, bias=True, ignore_index=-100):
    hidden = torch.randn(n, h, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, dtype=torch.float64) / math.sqrt(h) * 3).to(dtype)
    b = torch.randn(v, dtype=torch.float64).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < 0.2] = ignore_index
    return hidden, weight, b, targets


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,v,h,bias,temperature", [
    (0, 17, 8, True, 1.0), (1, 17, 8, False, 1.0), (7, 33, 16, True, 0.7), (1023, 129, 24, True, 1.3),
    (600, 8192 + 37, 8, True, 1.0),  # several row chunks (512) and vocabulary chunks (8192)
])
def test_linear_logprob_entropy_fwd_bwd_match_reference(n, v, h, bias, temperature, dtype):
    ignore_index = -7
    hidden, weight, b, targets = _lle_inputs(n, v, h, dtype, bias, ignore_index)
    logp, ent, lse = ops.linear_logprob_entropy_fwd_native(hidden, weight, targets, b, temperature, ignore_index)
    # Oracle: the materialized form in float64 with autograd.
    hx = hidden.double().requires_grad_(True)
    wx = weight.double().requires_grad_(True)
    bx = b.double().requires_grad_(True) if b is not None else None
    r_logp, r_ent, r_lse = linear_logprob_entropy_materialized(hx, wx, targets, bias=bx, temperature=temperature,
                                                               ignore_index=ignore_index)
    out_dt = torch.float64 if dtype == torch.float64 else torch.float32
    assert logp.dtype == ent.dtype == lse.dtype == out_dt
    _close(logp, r_logp, dtype, "logp")
    _close(ent, r_ent, dtype, "entropy")
    _close(lse, r_lse, dtype, "lse")
    g_lp = torch.randn(n, dtype=torch.float64)
    g_ent = torch.randn(n, dtype=torch.float64)
    dh, dw, db = ops.linear_logprob_entropy_bwd_native(hidden, weight, targets, b, lse, ent, g_lp.to(dtype),
                                                       g_ent.to(dtype), temperature, ignore_index, True, True, True)
    if n == 0:
        assert dh.shape == (0, h) and (dw == 0).all()
        return
    inputs = [hx, wx] + ([bx] if bx is not None else [])
    grads = torch.autograd.grad((r_logp * g_lp).sum() + (r_ent * g_ent).sum(), inputs)
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    names = ["dhidden", "dweight"] + (["dbias"] if b is not None else [])
    native = [dh, dw] + ([db] if b is not None else [])
    if b is None:
        assert db.numel() == 0
    if dtype == torch.float64:
        for name, got, want in zip(names, native, grads):
            _close(got, want, dtype, name)
        return
    # fp32: gradients sum over the whole vocabulary, so compare errors, not values (STYLE.md): the
    # native error may be at most 3x that of plain torch in fp32 (materialized logits) plus a small atol.
    h32 = hidden.clone().requires_grad_(True)
    w32 = weight.clone().requires_grad_(True)
    b32 = b.clone().requires_grad_(True) if b is not None else None
    t_logp, t_ent, _ = linear_logprob_entropy_materialized(h32, w32, targets, bias=b32, temperature=temperature,
                                                           ignore_index=ignore_index)
    t_grads = torch.autograd.grad((t_logp * g_lp.float()).sum() + (t_ent * g_ent.float()).sum(),
                                  [h32, w32] + ([b32] if b32 is not None else []))
    for name, got, want, base in zip(names, native, grads, t_grads):
        assert got.dtype == base.dtype and not torch.isnan(got).any(), name
        err = (got.double() - want).abs().max().item()
        base_err = (base.double() - want).abs().max().item()
        # atol scales with the gradient: a chance-small torch error must not make the bound flaky
        atol = 2e-5 * max(1.0, want.abs().max().item())
        assert err <= 3 * base_err + atol, f"{name}: native error {err:.3g} vs torch fp32 error {base_err:.3g}"


def test_linear_logprob_entropy_bwd_returns_empty_for_unneeded_grads():
    hidden, weight, b, targets = _lle_inputs(5, 11, 4, torch.float32)
    logp, ent, lse = ops.linear_logprob_entropy_fwd_native(hidden, weight, targets, b, 1.0, -100)
    g = torch.ones(5)
    dh, dw, db = ops.linear_logprob_entropy_bwd_native(hidden, weight, targets, b, lse, ent, g, g, 1.0, -100,
                                                       False, True, False)
    assert dh.numel() == 0 and db.numel() == 0 and dw.shape == weight.shape


def test_linear_logprob_entropy_ignored_rows_are_zero_and_get_no_gradient():
    hidden, weight, b, targets = _lle_inputs(6, 13, 4, torch.float64)
    targets[:] = -100
    logp, ent, lse = ops.linear_logprob_entropy_fwd_native(hidden, weight, targets, b, 1.0, -100)
    assert (logp == 0).all() and (ent == 0).all() and (lse == 0).all()
    g = torch.randn(6, dtype=torch.float64)
    dh, dw, db = ops.linear_logprob_entropy_bwd_native(hidden, weight, targets, b, lse, ent, g, g, 1.0, -100,
                                                       True, True, True)
    assert (dh == 0).all() and (dw == 0).all() and (db == 0).all()


def test_linear_logprob_entropy_bf16_inputs_compute_in_fp32():
    hidden, weight, b, targets = _lle_inputs(31, 57, 16, torch.bfloat16)
    logp, ent, lse = ops.linear_logprob_entropy_fwd_native(hidden, weight, targets, b, 1.0, -100)
    r_logp, r_ent, r_lse = linear_logprob_entropy_materialized(hidden.double(), weight.double(), targets,
                                                               bias=b.double())
    assert logp.dtype == torch.float32
    # fp32 logits from the exact bf16 inputs: only fp32 rounding separates the two.
    torch.testing.assert_close(logp.double(), r_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), r_ent, rtol=1e-5, atol=1e-5)


def test_linear_logprob_entropy_bad_inputs_name_the_argument():
    hidden, weight, b, targets = _lle_inputs(4, 9, 3, torch.float32)
    fwd = ops.linear_logprob_entropy_fwd_native
    with pytest.raises(RuntimeError, match="targets"):
        fwd(hidden, weight, torch.tensor([0, 1, 9, 2]), b, 1.0, -100)
    with pytest.raises(RuntimeError, match="targets"):
        fwd(hidden, weight, torch.tensor([0, 1, -3, 2]), b, 1.0, -100)
    with pytest.raises(RuntimeError, match="targets"):
        fwd(hidden, weight, targets.float(), b, 1.0, -100)
    with pytest.raises(RuntimeError, match="weight"):
        fwd(hidden, weight[:, :2], targets, b, 1.0, -100)
    with pytest.raises(RuntimeError, match="bias"):
        fwd(hidden, weight, targets, b[:3], 1.0, -100)
    with pytest.raises(RuntimeError, match="temperature"):
        fwd(hidden, weight, targets, b, 0.0, -100)
    with pytest.raises(RuntimeError, match="hidden"):
        fwd(hidden[0], weight, targets, b, 1.0, -100)


# ----------------------------------------------------------------------------------------------- opcheck

def _opcheck(op, args):
    # The native ops have no autograd of their own (the Python layer attaches it), so only the schema and
    # the fake (Meta) kernels are checked.
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_opcheck_native_ops():
    rewards, ids, metric = _rollouts(37, torch.float32)
    _opcheck(ops.group_advantages_native.default, (rewards, ids, "canon", "group", 1e-6, 0.1, metric))
    _opcheck(ops.group_advantages_native.default, (rewards.double(), ids, "grpo", "batch", 1e-6, 0.1, None))
    e = torch.rand(41)
    v = torch.rand(41) < 0.5
    _opcheck(ops.entropy_mask_native.default, (e, v, int(v.sum()) // 2))
    for dtype in (torch.float32, torch.float64):
        t = _tokens(53, dtype)
        cfg = PolicyLossConfig(loss="gspo", aggregation="seq_mean_token_mean", beta=0.1, entropy_coef=0.01)
        _opcheck(ops.policy_loss_native.default, (t["logp"], t["old_logp"], t["advantages"], t["loss_weight"],
                                                  t["ref_logp"], t["is_weight"], t["seq_index"], t["entropy"],
                                                  t["entropy_mask"], *cfg.to_op_args()))
    for dtype in (torch.float32, torch.float64):
        hidden, weight, b, targets = _lle_inputs(19, 23, 8, dtype)
        _opcheck(ops.linear_logprob_entropy_fwd_native.default, (hidden, weight, targets, b, 1.0, -100))
        logp, ent, lse = ops.linear_logprob_entropy_fwd_native(hidden, weight, targets, b, 1.0, -100)
        for needs in ((True, True, True), (False, True, False), (True, False, False)):
            _opcheck(ops.linear_logprob_entropy_bwd_native.default,
                     (hidden, weight, targets, b, lse, ent, torch.randn_like(lse), torch.randn_like(lse), 1.0, -100,
                      *needs))


def test_loader_flags():
    assert _native.CPU_AVAILABLE and _native.load_error is None
    assert _native.CUDA_AVAILABLE == (_native.CUDA_COMPILED and torch.cuda.is_available())
