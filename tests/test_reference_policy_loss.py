"""Reference policy_loss / PolicyLossConfig / fused_linear_policy_loss: hand cases, stats, config errors and
float64 gradcheck for every loss x aggregation.

Hand cases set old_logp = 0, so ratio = exp(logp) and logp = ln(ratio).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from rubric_fast.reference import (
    AGGREGATIONS, LOSSES, PolicyLossConfig, fused_linear_policy_loss, linear_logprob_entropy, policy_loss,
)
from rubric_fast.reference import entropy_mask as reference_entropy_mask

F64 = torch.float64


def _t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def _lp(ratios):
    return torch.log(_t(ratios)).requires_grad_(True)


def _run(ratios, adv, w, cfg, **kw):
    logp = _lp(ratios)
    loss, stats = policy_loss(logp, torch.zeros_like(logp), _t(adv), _t(w), config=cfg, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, stats, grad


def close(a, b, tol=1e-12):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), rtol=tol, atol=tol)


# ---------------------------------------------------------------- ppo_clip family


PPO_RATIOS = [1.5, 0.5, 1.1, 0.5, 1.5, 3.0]
PPO_ADV = [1.0, -1.0, 2.0, 1.0, -1.0, -2.0]
PPO_W = [1, 1, 1, 1, 1, 0]


def test_ppo_clip_asymmetric_eps_and_stats():
    # clip range [1 - 0.2, 1 + 0.28] = [0.8, 1.28]; l = -min(rho A, clip(rho) A)
    # t0 rho 1.5  A +1: min(1.5, 1.28) = 1.28 -> l = -1.28 (clipped high), grad 0
    # t1 rho 0.5  A -1: min(-0.5, -0.8) = -0.8 -> l = 0.8 (clipped low), grad 0
    # t2 rho 1.1  A +2: 2.2 both -> l = -2.2, dl/dlogp = -rho A = -2.2
    # t3 rho 0.5  A +1: min(0.5, 0.8) = 0.5 -> l = -0.5, grad -0.5 (low but A > 0: not a clip)
    # t4 rho 1.5  A -1: min(-1.5, -1.28) = -1.5 -> l = 1.5, grad +1.5 (high but A < 0: not a clip)
    # t5 weight 0: does not count
    # token_mean: (-1.28 + 0.8 - 2.2 - 0.5 + 1.5) / 5 = -1.68 / 5 = -0.336
    cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.28)
    loss, st, g = _run(PPO_RATIOS, PPO_ADV, PPO_W, cfg)
    close(loss, -0.336)
    close(g, [0, 0, -2.2 / 5, -0.5 / 5, 1.5 / 5, 0])
    # stats over the 5 counted tokens: 1 clipped low (t1), 1 clipped high (t0);
    # ratio mean (1.5 + 0.5 + 1.1 + 0.5 + 1.5) / 5 = 1.02; no ref -> kl_mean 0
    assert st.clip_frac_low.dtype == torch.float32
    close(st.clip_frac_low, 0.2, 1e-6)
    close(st.clip_frac_high, 0.2, 1e-6)
    close(st.ratio_mean, 1.02, 1e-6)
    assert st.kl_mean.item() == 0.0


def test_ppo_clip_delta():
    # delta = 1.4 caps the unclipped ratio: t4 rho 1.5 A -1: min(-1.4, -1.28) = -1.4 -> l = 1.4, grad 0
    # t0 rho 1.5 A +1: min(1.4, 1.28) = 1.28 unchanged. Loss (-1.28 + 0.8 - 2.2 - 0.5 + 1.4) / 5 = -0.356
    cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.28, delta=1.4)
    loss, _, g = _run(PPO_RATIOS, PPO_ADV, PPO_W, cfg)
    close(loss, -0.356)
    close(g, [0, 0, -2.2 / 5, -0.5 / 5, 0, 0])


def test_ppo_dual_clip():
    # c = 3, eps 0.2: t0 rho 4 A -1: ppo l = -min(-4, -1.2) = 4 -> min(4, 3 * 1) = 3 (grad 0)
    # t1 rho 2 A -1: l = 2 < 3 stays, grad -rho A = 2; t2 rho 4 A +1: l = -1.2 (clipped), A > 0 untouched
    # mean (3 + 2 - 1.2) / 3 = 3.8 / 3
    loss, _, g = _run([4.0, 2.0, 4.0], [-1.0, -1.0, 1.0], [1, 1, 1], PolicyLossConfig(dual_clip=3.0))
    close(loss, 3.8 / 3)
    close(g, [0, 2 / 3, 0])


def test_cispo():
    # eps_high 0.28 (eps_low is ignored): l = -sg(min(rho, 1.28)) A logp
    # t0 rho 1.5 A +1: -1.28 ln1.5, grad -1.28
    # t1 rho 0.5 A -1: -0.5 (-1) ln0.5 = -0.5 ln2, grad +0.5 (0.5 < 0.8 but cispo has no lower clip)
    # t2 rho 1.1 A +2 weight 2: -1.1 * 2 * ln1.1 = -2.2 ln1.1, grad -2.2
    # token_mean over sum w = 4: (-1.28 ln1.5 - 0.5 ln2 - 2 * 2.2 ln1.1) / 4
    cfg = PolicyLossConfig(loss="cispo", eps_low=0.2, eps_high=0.28)
    loss, st, g = _run([1.5, 0.5, 1.1], [1.0, -1.0, 2.0], [1, 1, 2], cfg)
    close(loss, (-1.28 * math.log(1.5) - 0.5 * math.log(2) - 4.4 * math.log(1.1)) / 4)
    close(g, [-1.28 / 4, 0.5 / 4, 2 * -2.2 / 4])
    close(st.clip_frac_high, 1 / 3, 1e-6)  # rho > 1.28 and A > 0 among the 3 counted tokens: t0


def test_sapo():
    # l = -(4 / tau) sigmoid(tau (rho - 1)) A, tau = 1 for A > 0, 1.05 for A < 0
    # t0 rho 1 A +1: -4 * 0.5 = -2;  t1 rho 1 A -1: (4 / 1.05) * 0.5 = 2 / 1.05
    # t2 rho 1.5 A +2: -4 sigmoid(0.5) * 2 = -8 s, s = sigmoid(0.5)
    # dl/dlogp = -(4 / tau) sigmoid' tau rho A = -4 s(1 - s) rho A: t0 -4 * 1/4 * 1 = -1; t1 +1;
    #   t2 -4 s (1 - s) * 1.5 * 2 = -12 s (1 - s)
    s = 1 / (1 + math.exp(-0.5))
    loss, _, g = _run([1.0, 1.0, 1.5], [1.0, -1.0, 2.0], [1, 1, 1], PolicyLossConfig(loss="sapo"))
    close(loss, (-2 + 2 / 1.05 - 8 * s) / 3)
    close(g, [-1 / 3, 1 / 3, -12 * s * (1 - s) / 3])


def test_gspo_sequence_ratio():
    # seq 0 = tokens 0..2 with log-ratios (ln2, 0, ln0.5): mean 0 -> seq ratio 1 for all three, A = +1
    #   l = -1 each, dl/dlogp_t = -rho_t A = -1
    # seq 1 = tokens 3, 4; token 4 has weight 0 and is excluded from the mean: seq ratio = 1.5, A = +1
    #   clipped at 1.2 -> l = -1.2, grad 0; token 4 does not count
    # token_mean over 4 tokens: (-3 - 1.2) / 4 = -1.05; stats: ratio mean (1 + 1 + 1 + 1.5) / 4 = 1.125,
    # clip_frac_high 1/4
    logp = torch.log(_t([2.0, 1.0, 0.5, 1.5, 100.0])).requires_grad_(True)
    seq = torch.tensor([0, 0, 0, 4, 4])
    args = (logp, torch.zeros(5, dtype=F64), _t([1.0, 1, 1, 1, 1]), _t([1.0, 1, 1, 1, 0]))
    loss, st = policy_loss(*args, seq_index=seq, config=PolicyLossConfig(loss="gspo"))
    close(loss, -1.05)
    close(torch.autograd.grad(loss, logp)[0], [-0.25, -0.25, -0.25, 0, 0])
    close(st.ratio_mean, 1.125, 1e-6)
    close(st.clip_frac_high, 0.25, 1e-6)
    # seq_mean_token_mean: seq 0 mean -1, seq 1 mean -1.2 -> -1.1
    loss2, _ = policy_loss(*args, seq_index=seq, config=PolicyLossConfig(loss="gspo",
                                                                          aggregation="seq_mean_token_mean"))
    close(loss2, -1.1)
    with pytest.raises(ValueError, match="seq_index"):
        policy_loss(*args, config=PolicyLossConfig(loss="gspo"))


# ---------------------------------------------------------------- KL, entropy, is_weight, entropy_mask


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators(kind):
    # A = 0 -> the policy term is 0; per-token loss = beta KL with d = ref - logp = (ln2, -1)
    # k1 = -d = (-ln2, 1);  k2 = d^2 / 2 = (ln2^2 / 2, 1/2);  k3 = e^d - d - 1 = (1 - ln2, e^-1)
    # d/dlogp (dd/dlogp = -1): k1 -> 1, k2 -> -d, k3 -> 1 - e^d
    ln2 = math.log(2)
    logp = _t([-1.0, -2.0]).requires_grad_(True)
    ref = logp.detach() + _t([ln2, -1.0])
    k = {"k1": [-ln2, 1.0], "k2": [ln2 ** 2 / 2, 0.5], "k3": [1 - ln2, math.exp(-1)]}[kind]
    dk = {"k1": [1.0, 1.0], "k2": [-ln2, 1.0], "k3": [1 - 2.0, 1 - math.exp(-1)]}[kind]
    cfg = PolicyLossConfig(beta=0.5, kl=kind)
    loss, st = policy_loss(logp, logp.detach() - 0.3, _t([0.0, 0.0]), _t([1.0, 1.0]), ref_logp=ref, config=cfg)
    close(loss, 0.5 * (k[0] + k[1]) / 2)
    close(st.kl_mean, (k[0] + k[1]) / 2, 1e-6)
    close(torch.autograd.grad(loss, logp)[0], [0.5 * dk[0] / 2, 0.5 * dk[1] / 2])
    # ref_logp with beta = 0 still reports kl_mean but adds nothing
    loss0, st0 = policy_loss(logp, logp.detach(), _t([0.0, 0.0]), _t([1.0, 1.0]), ref_logp=ref,
                             config=PolicyLossConfig(kl=kind))
    close(loss0, 0.0)
    close(st0.kl_mean, (k[0] + k[1]) / 2, 1e-6)


def test_is_weight_entropy_coef_entropy_mask():
    # rho = 1 everywhere, A = (1, -2, 3) -> pg = -A = (-1, 2, -3)
    # is_weight (0.5, 2, 1) scales the policy term only: (-0.5, 4, -3)
    # beta 0.1 k1 with d = ref - logp = (-1, 0, 1): KL = (1, 0, -1) -> + (0.1, 0, -0.1) (not is-weighted)
    # entropy_coef 0.01, entropy (2, 3, 4): - (0.02, 0.03, 0.04)
    # per token: (-0.42, 3.97, -3.14); entropy_mask (1, 0, 1): (-0.42, 0, -3.14)
    # token_mean, normalizer = sum w = 3 (the mask does not change the count): -3.56 / 3
    logp = _t([-0.5, -1.0, -1.5]).requires_grad_(True)
    ent = _t([2.0, 3.0, 4.0]).requires_grad_(True)
    cfg = PolicyLossConfig(beta=0.1, kl="k1", entropy_coef=0.01)
    loss, _ = policy_loss(logp, logp.detach(), _t([1.0, -2.0, 3.0]), _t([1.0, 1.0, 1.0]),
                          ref_logp=logp.detach() + _t([-1.0, 0.0, 1.0]), is_weight=_t([0.5, 2.0, 1.0]),
                          config=cfg, entropy=ent, entropy_mask=torch.tensor([True, False, True]))
    close(loss, -3.56 / 3)
    g_lp, g_ent = torch.autograd.grad(loss, (logp, ent))
    # d pg / d logp = -A rho * is_weight = (-0.5, 4, -3); d(beta k1)/dlogp = 0.1; masked token 1 -> 0
    close(g_lp, [(-0.5 + 0.1) / 3, 0.0, (-3 + 0.1) / 3])
    close(g_ent, [-0.01 / 3, 0.0, -0.01 / 3])


def test_required_inputs():
    x = _t([0.0, 0.0])
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(x, x, x, x, config=PolicyLossConfig(beta=0.1))
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(x, x, x, x, config=PolicyLossConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, _t([0.0]), x, config=PolicyLossConfig())


# ---------------------------------------------------------------- aggregations


# rho = 1 (logp == old_logp), A = -l so the per-token loss is l = (1, 2, 3, 4, 5, 6, 7)
# seq (0, 0, 0, 1, 1, 2, 2), w = (1, 1, 2, 1, 0, 0, 0): seq 2 has no counted token
# sum w l = 1 + 2 + 6 + 4 = 13, sum w = 5
# seq_mean_token_mean: seq 0 (1 + 2 + 6) / 4 = 2.25, seq 1 4 / 1 = 4, |S| = 2
# seq_mean_token_sum: seq 0 9, seq 1 4
AGG_CASES = [
    ("token_mean", None, 13 / 5, [1 / 5, 2 / 5, 2 * 3 / 5, 4 / 5, 0, 0, 0]),
    ("token_mean", 10.0, 13 / 10, [1 / 10, 2 / 10, 6 / 10, 4 / 10, 0, 0, 0]),
    ("seq_mean_token_mean", None, (2.25 + 4) / 2, [1 / 8, 2 / 8, 6 / 8, 4 / 2, 0, 0, 0]),
    ("seq_mean_token_mean", 5.0, 6.25 / 5, [1 / 20, 2 / 20, 6 / 20, 4 / 5, 0, 0, 0]),
    ("seq_mean_token_sum", None, 13 / 2, [1 / 2, 2 / 2, 6 / 2, 4 / 2, 0, 0, 0]),
    ("seq_mean_token_sum", 5.0, 13 / 5, [1 / 5, 2 / 5, 6 / 5, 4 / 5, 0, 0, 0]),
    ("constant", 8.0, 13 / 8, [1 / 8, 2 / 8, 6 / 8, 4 / 8, 0, 0, 0]),
]


@pytest.mark.parametrize("agg,normalizer,expected,grad", AGG_CASES)
def test_aggregation(agg, normalizer, expected, grad):
    # dl_t/dlogp_t = -A rho = l_t, so dL/dlogp_t = w_t l_t / (the token's denominator)
    logp = _t([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7]).requires_grad_(True)
    loss, _ = policy_loss(logp, logp.detach(), -_t([1.0, 2, 3, 4, 5, 6, 7]), _t([1.0, 1, 2, 1, 0, 0, 0]),
                          seq_index=torch.tensor([0, 0, 0, 1, 1, 2, 2]),
                          config=PolicyLossConfig(aggregation=agg, normalizer=normalizer))
    close(loss, expected)
    close(torch.autograd.grad(loss, logp)[0], grad)


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_empty_batch_and_all_zero_weights(loss_name, agg):
    cfg = PolicyLossConfig(loss=loss_name, aggregation=agg, normalizer=4.0 if agg == "constant" else None,
                           beta=0.1, entropy_coef=0.01)
    for n, w in ((0, []), (3, [0.0, 0.0, 0.0])):
        logp = (-torch.rand(n, dtype=F64)).requires_grad_(True)
        ent = torch.rand(n, dtype=F64).requires_grad_(True)
        loss, st = policy_loss(logp, logp.detach() + 0.1, torch.randn(n, dtype=F64), _t(w),
                               ref_logp=logp.detach() - 0.2, seq_index=torch.arange(n), config=cfg, entropy=ent)
        assert loss.item() == 0.0 and loss.shape == ()
        for s in st:
            assert s.item() == 0.0
        g = torch.autograd.grad(loss, (logp, ent), allow_unused=True)
        for x in g:
            assert x is None or (torch.isfinite(x).all() and (x == 0).all())


@pytest.mark.parametrize("loss_name", ["ppo_clip", "cispo", "sapo", "gspo"])
def test_zero_weight_tokens_do_not_count_even_with_extreme_ratio(loss_name):
    """docs/ops-math.md: "a token with w_t = 0 does not count". A padded position whose (finite) log-ratio
    overflows exp() must not turn the loss, its gradient or the stats into NaN."""
    logp = _t([-0.2, 800.0]).requires_grad_(True)      # token 1: padding, log-ratio 900 -> exp = inf
    old = _t([-0.1, -100.0])
    adv, w, seq = _t([1.0, -1.0]), _t([1.0, 0.0]), torch.tensor([0, 1])
    cfg = PolicyLossConfig(loss=loss_name)
    loss, st = policy_loss(logp, old, adv, w, seq_index=seq, config=cfg)
    loss1, st1 = policy_loss(logp[:1], old[:1], adv[:1], w[:1], seq_index=seq[:1], config=cfg)
    assert torch.isfinite(loss), f"loss = {loss}"
    close(loss, loss1)
    g = torch.autograd.grad(loss, logp)[0]
    assert torch.isfinite(g).all(), f"grad = {g}"
    for a, b, name in zip(st, st1, st._fields):
        assert torch.isfinite(a), f"stats.{name} = {a}"
        close(a, b, 1e-6)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize("kwargs,field", [
    (dict(loss="x"), "loss"),
    (dict(kl="k4"), "kl"),
    (dict(aggregation="sum"), "aggregation"),
    (dict(eps_low=1.5), "eps_low"),
    (dict(eps_low=-0.1), "eps_low"),
    (dict(eps_high=-0.1), "eps_high"),
    (dict(eps_high=float("nan")), "eps_high"),
    (dict(delta=1.2), "delta"),                       # delta <= 1 + eps_high (= 1.2)
    (dict(eps_high=0.28, delta=1.25), "delta"),
    (dict(dual_clip=1.0), "dual_clip"),
    (dict(beta=-0.1), "beta"),
    (dict(aggregation="constant"), "normalizer"),     # constant without normalizer
    (dict(normalizer=0.0), "normalizer"),
    (dict(top_entropy_fraction=0.0), "top_entropy_fraction"),
    (dict(top_entropy_fraction=1.5), "top_entropy_fraction"),
    (dict(sapo_tau_pos=0.0), "sapo_tau_pos"),
    (dict(sapo_tau_neg=0.0), "sapo_tau_neg"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"PolicyLossConfig.{field}"):
        PolicyLossConfig(**kwargs)


def test_config_accepts_and_replace():
    cfg = PolicyLossConfig(delta=1.21, dual_clip=1.01, aggregation="constant", normalizer=7,
                           top_entropy_fraction=1.0)
    assert cfg.replace(loss="sapo").loss == "sapo" and cfg.replace(loss="sapo").delta == 1.21
    with pytest.raises(ValueError, match="loss"):
        cfg.replace(loss="nope")
    assert (cfg.loss_code, cfg.aggregation_code, PolicyLossConfig(kl="k2").kl_code) == (0, 3, 1)


# ---------------------------------------------------------------- gradcheck, every loss x aggregation


BOUNDARIES = (0.8, 1.28, 1.45, 3.0)  # 1 - eps_low, 1 + eps_high, delta, dual_clip


def _points(seed, loss_name, n=11):
    """Random inputs whose ratios (the sequence ratio for gspo) keep >= 0.04 away from every kink."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        logp = -torch.rand(n, generator=g, dtype=F64) * 3
        if loss_name == "cispo":
            # the detached weight sg(min(rho, 1 + eps)) has a true derivative that autograd drops on purpose;
            # numeric differences agree with it only where the weight is constant (rho > 1 + eps_high)
            ratio = 1.35 + torch.rand(n, generator=g, dtype=F64) * 2
        else:
            ratio = torch.cat([torch.rand(n - 3, generator=g, dtype=F64) * 1.1 + 0.5,
                               torch.rand(3, generator=g, dtype=F64) + 3.1])[torch.randperm(n, generator=g)]
        old = logp - torch.log(ratio)
        if all(float((ratio - b).abs().min()) > 0.04 for b in BOUNDARIES):
            return logp, old, g
    raise AssertionError("could not sample away from the clip boundaries")


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_gradcheck_every_loss_and_aggregation(loss_name, agg):
    seed = random.randrange(2**31)
    n = 11
    logp, old, g = _points(seed, loss_name, n)
    adv = torch.randn(n, generator=g, dtype=F64)
    w = (torch.rand(n, generator=g) < 0.8).to(F64) * torch.randint(1, 3, (n,), generator=g).to(F64)
    # gspo's ratio is sg(seq ratio) * exp(logp - sg(logp)): its value depends on the other tokens of the
    # sequence through a stop-gradient, so numeric differences match autograd only for one-token sequences
    # (multi-token gspo gradients are checked by hand in test_gspo_sequence_ratio)
    seq = torch.arange(n) if loss_name == "gspo" else torch.randint(0, 4, (n,), generator=g)
    ent = torch.rand(n, generator=g, dtype=F64) * 3
    ref = logp - torch.randn(n, generator=g, dtype=F64) * 0.3
    is_w = torch.rand(n, generator=g, dtype=F64) + 0.5
    emask = torch.rand(n, generator=g) < 0.7
    cfg = PolicyLossConfig(loss=loss_name, aggregation=agg, eps_low=0.2, eps_high=0.28,
                           # with delta set the dual clip can never bind (pg <= delta |A| < 3 |A|): ppo_clip
                           # exercises dual_clip, gspo exercises delta
                           delta=1.45 if loss_name == "gspo" else None,
                           dual_clip=3.0 if loss_name == "ppo_clip" else None,
                           beta=0.07, kl=random.choice(["k1", "k2", "k3"]), entropy_coef=0.013,
                           normalizer=17.0 if agg == "constant" else None)

    def fn(lp, en):
        return policy_loss(lp, old, adv, w, ref_logp=ref, is_weight=is_w, seq_index=seq, config=cfg,
                           entropy=en, entropy_mask=emask)[0]

    args = (logp.clone().requires_grad_(True), ent.clone().requires_grad_(True))
    assert not torch.isnan(fn(*args))
    assert torch.autograd.gradcheck(fn, args, eps=1e-7, atol=1e-8, rtol=1e-6), f"seed={seed} cfg={cfg}"


def test_cispo_gradient_in_unclipped_region():
    # cispo dL/dlogp_t = -w_t min(rho_t, 1 + eps_high) A_t / sum w, including rho < 1 + eps_high where the
    # weight is a stop-gradient (not checkable by finite differences)
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    n = 9
    logp = (-torch.rand(n, generator=g, dtype=F64) * 2).requires_grad_(True)
    ratio = torch.rand(n, generator=g, dtype=F64) * 1.5 + 0.3
    adv, w = torch.randn(n, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g).to(F64)
    loss, _ = policy_loss(logp, logp.detach() - ratio.log(), adv, w, config=PolicyLossConfig(loss="cispo"))
    exp = -w * ratio.clamp(max=1.2) * adv / w.sum()
    close(torch.autograd.grad(loss, logp)[0], exp)


# ---------------------------------------------------------------- fused_linear_policy_loss


def _fused_inputs(seed, ratios, n=7, h=3, v=6):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64).requires_grad_(True)
    weight = torch.randn(v, h, generator=g, dtype=F64).requires_grad_(True)
    bias = torch.randn(v, generator=g, dtype=F64).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[2] = -100
    with torch.no_grad():
        lp0, _, _ = linear_logprob_entropy(hidden, weight, targets, bias=bias, temperature=0.8)
    # old_logp far enough from logp that no ratio sits on a clip boundary under a 1e-6 perturbation
    ratio = torch.where(torch.rand(n, generator=g) < 0.5, torch.full((n,), ratios[0], dtype=F64),
                        torch.full((n,), ratios[1], dtype=F64))
    old = lp0 - ratio.log()
    adv = torch.randn(n, generator=g, dtype=F64)
    w = torch.ones(n, dtype=F64)
    w[2] = 0.0
    w[5] = 0.0
    return hidden, weight, bias, targets, old, adv, w


@pytest.mark.parametrize("cfg", [
    PolicyLossConfig(entropy_coef=0.05, beta=0.1, kl="k3"),
    PolicyLossConfig(loss="sapo", aggregation="seq_mean_token_mean", top_entropy_fraction=0.5),
    PolicyLossConfig(loss="cispo", eps_high=0.01, aggregation="constant", normalizer=9.0, entropy_coef=0.02),
], ids=["ppo_kl_entropy", "sapo_topentropy", "cispo_constant"])
def test_fused_matches_composition_and_gradcheck(cfg):
    seed = random.randrange(2**31)
    # cispo: only ratios above 1 + eps_high, where its stop-gradient weight is constant (see _points)
    ratios = (1.07, 1.5) if cfg.loss == "cispo" else (0.6, 1.07)
    hidden, weight, bias, targets, old, adv, w = _fused_inputs(seed, ratios)
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    ref = old + 0.1

    def fused(hd, wt, bs):
        return fused_linear_policy_loss(hd, wt, targets, old, adv, w, ref_logp=ref, seq_index=seq, config=cfg,
                                        bias=bs, temperature=0.8)

    loss, stats, logp, ent = fused(hidden, weight, bias)
    # independent composition: same pieces called by hand
    lp2, ent2, _ = linear_logprob_entropy(hidden, weight, targets, bias=bias, temperature=0.8)
    emask = None
    if cfg.top_entropy_fraction is not None:
        emask = reference_entropy_mask(ent2.detach(), (w != 0) & (targets != -100), cfg.top_entropy_fraction)
        assert int(emask.sum()) == math.ceil(cfg.top_entropy_fraction * 5)
    loss2, stats2 = policy_loss(lp2, old, adv, w, ref_logp=ref, seq_index=seq, config=cfg, entropy=ent2,
                                entropy_mask=emask)
    close(loss, loss2)
    close(logp, lp2)
    close(ent, ent2)
    for a, b in zip(stats, stats2):
        close(a, b, 1e-6)
    assert torch.isfinite(loss)
    f = lambda a, b, c: fused(a, b, c)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-6, atol=1e-8, rtol=1e-6), f"seed={seed}"
