"""Reference group_advantages: hand-computed batch for every estimator x scale, plus a pure-Python oracle."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from rubric_fast.reference import group_advantages, resolve_scale

NAN = float("nan")
EPS = 1e-6

# One batch, groups interleaved, ids arbitrary (negative, non-contiguous):
#   pos:     0  1  2  3  4    5  6    7  8    9  10   11 12
#   group:   7  3  7  5  -1   9  7    5  7    9  -1   9  9
#   reward:  1  2  0  3  NaN  0  NaN  3  0.5  1  NaN  1  0
# group 7: valid {1, 0, 0.5} (pos 6 missing): n=3, mean 0.5, devs (0.5, -0.5, 0), var = 0.5/2 -> std 0.5
# group 3: {2}: group of one, mean 2, std 0
# group 5: {3, 3}: equal rewards, mean 3, std 0
# group -1: no valid member
# group 9: {0, 1, 1, 0}: mean 0.5, devs +-0.5, var = 4 * 0.25 / 3 = 1/3 -> std 1/sqrt(3)
# batch (valid): 1,2,0,3,0,3,0.5,1,1,0: sum 11.5, mean 1.15, sum sq 25.25,
#   sum (r - mean)^2 = 25.25 - 10 * 1.15^2 = 12.025 -> std_batch = sqrt(12.025 / 9)
REWARDS = [1, 2, 0, 3, NAN, 0, NAN, 3, 0.5, 1, NAN, 1, 0]
GROUPS = [7, 3, 7, 5, -1, 9, 7, 5, 7, 9, -1, 9, 9]
VALID = [not math.isnan(r) for r in REWARDS]
STD_G = {7: 0.5, 3: 0.0, 5: 0.0, -1: 0.0, 9: 1 / math.sqrt(3)}
STD_B = math.sqrt(12.025 / 9)
# CANON metric; group 7: metrics (5, 1, 3) on valid pos (0, 2, 8) -> median 3, high = {pos 0}
#   pos 0 (high): r - mean(low) = 1 - (0 + 0.5)/2 = 0.75; pos 2: 0 - mean(high) = 0 - 1 = -1; pos 8: 0.5 - 1 = -0.5
# group 3: single, high subgroup empty -> falls back to the group mean: 2 - 2 = 0
# group 5: metrics (2, 2) -> median 2, nobody > 2, other subgroup empty -> 3 - 3 = 0
# group 9: metrics (4, 1, 2, 3) at pos (5, 9, 11, 12): lower median 2 -> high = {pos 5, 12} (r 0, 0),
#   low = {pos 9, 11} (r 1, 1): pos 5, 12: 0 - 1 = -1; pos 9, 11: 1 - 0 = 1
METRIC = [5, 0, 1, 2, 0, 4, 100, 2, 3, 1, 0, 2, 3]

# centred values c per estimator (0 for missing rewards)
C = {
    # r - mean_g
    "grpo": [0.5, 0, -0.5, 0, 0, -0.5, 0, 0, 0, 0.5, 0, 0.5, -0.5],
    # (r - mean_g) * n / (n - 1): group 7 x 3/2, group 9 x 4/3, groups of one -> 0
    "rloo": [0.75, 0, -0.75, 0, 0, -2 / 3, 0, 0, 0, 2 / 3, 0, 2 / 3, -2 / 3],
    # lambda r - (1 - r) with lambda = 0.1: r=1 -> 0.1, 0 -> -1, 0.5 -> -0.45, 2 -> 1.2, 3 -> 2.3
    "w_reinforce": [0.1, 1.2, -1, 2.3, 0, -1, 0, 2.3, -0.45, 0.1, 0, 0.1, -1],
    "canon": [0.75, 0, -1, 0, 0, -1, 0, 0, -0.5, 1, 0, 1, -1],
}
C["dr_grpo"] = C["grpo"]


def _t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def _expected(est, scale):
    out = []
    for c, g, ok in zip(C[est], GROUPS, VALID):
        if not ok:
            out.append(0.0)
        elif scale == "group":
            # a spread of 0 leaves c unscaled (docs/ops-math.md): only W-REINFORCE has c != 0 there
            out.append(c / (STD_G[g] + EPS) if STD_G[g] > 0 else c)
        elif scale == "batch":
            out.append(c / (STD_B + EPS))
        else:
            out.append(c)
    return out


CASES = [(e, s) for e in ("grpo", "rloo", "w_reinforce", "canon") for s in ("group", "batch", "none")]
CASES += [("dr_grpo", "none")]


@pytest.mark.parametrize("est,scale", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hand_batch(est, scale, dtype):
    adv, valid = group_advantages(_t(REWARDS, dtype), torch.tensor(GROUPS), estimator=est, scale=scale,
                                  eps=EPS, metric=_t(METRIC, dtype) if est == "canon" else None)
    assert adv.dtype == dtype and valid.dtype == torch.bool
    assert valid.tolist() == VALID
    assert not torch.isnan(adv).any()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(adv, _t(_expected(est, scale), dtype), rtol=tol, atol=tol)
    # missing rewards get exactly 0
    assert torch.all(adv[~valid] == 0)


@pytest.mark.parametrize("est,default", [("grpo", "group"), ("dr_grpo", "none"), ("rloo", "none"),
                                         ("w_reinforce", "none"), ("canon", "group")])
def test_scale_none_picks_estimator_default(est, default):
    assert resolve_scale(est, None) == default
    kw = dict(metric=_t(METRIC)) if est == "canon" else {}
    adv, _ = group_advantages(_t(REWARDS), torch.tensor(GROUPS), estimator=est, **kw)
    torch.testing.assert_close(adv, _t(_expected(est, default)), rtol=1e-12, atol=1e-12)


def test_positive_weight():
    # lambda = 0.3: c = 0.3 r - (1 - r) = 1.3 r - 1: r = 1 -> 0.3, r = 0 -> -1, r = 0.5 -> -0.35
    adv, _ = group_advantages(_t([1.0, 0.0, 0.5, NAN]), torch.tensor([0, 0, 1, 1]), estimator="w_reinforce",
                              positive_weight=0.3)
    torch.testing.assert_close(adv, _t([0.3, -1.0, -0.35, 0.0]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_dr_grpo_rejects_std_scaling(scale):
    with pytest.raises(ValueError, match="scale"):
        group_advantages(_t([1.0, 0.0]), torch.tensor([0, 0]), estimator="dr_grpo", scale=scale)


def test_bad_arguments():
    r, g = _t([1.0, 0.0]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(r, g, estimator="ppo")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, g, scale="token")
    with pytest.raises(ValueError, match="metric"):
        group_advantages(r, g, estimator="canon")
    with pytest.raises(ValueError, match="group_index"):
        group_advantages(r, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(r[None], g[None])


def test_empty_and_all_missing():
    adv, valid = group_advantages(_t([]), torch.zeros(0, dtype=torch.long))
    assert adv.shape == valid.shape == (0,)
    for est in ("grpo", "dr_grpo", "rloo", "w_reinforce"):
        for scale in ("group", "batch", "none") if est != "dr_grpo" else ("none",):
            adv, valid = group_advantages(_t([NAN, NAN, NAN]), torch.tensor([0, 0, 1]), estimator=est, scale=scale)
            assert adv.tolist() == [0.0, 0.0, 0.0] and valid.tolist() == [False, False, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("est", ["grpo", "dr_grpo", "rloo", "canon"])
def test_groups_of_one_and_exact_equal_groups(est, dtype):
    # values exactly representable and whose mean is exact -> c = 0 exactly, std = 0 -> A = 0
    r = _t([1.0, 0.5, 0.5, 0.5, 0.25, 0.0, 0.0, NAN], dtype)
    g = torch.tensor([0, 1, 1, 1, 2, 3, 3, 3])
    kw = dict(metric=torch.arange(8.0, dtype=dtype)) if est == "canon" else {}
    for scale in ("group", "batch", "none") if est != "dr_grpo" else ("none",):
        adv, _ = group_advantages(r, g, estimator=est, scale=scale, **kw)
        assert adv.tolist() == [0.0] * 8, (scale, adv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("est", ["grpo", "canon"])
def test_equal_rewards_give_zero_advantage_despite_rounding(est, dtype):
    """docs/ops-math.md: "A group of one, or of equal rewards, gets A = 0, never NaN."

    With rewards whose group mean is not exact in floating point (16 x 0.98 in fp32), r - mean is a rounding
    residue of ~1e-7 and std_g is the same order, so c / (std_g + eps) is O(0.1), not 0."""
    n = 16
    for v in (0.98, 0.7, 0.1, 1 / 3):
        r = torch.full((n,), v, dtype=dtype)
        kw = dict(metric=torch.arange(float(n), dtype=dtype)) if est == "canon" else {}
        adv, _ = group_advantages(r, torch.zeros(n, dtype=torch.long), estimator=est, scale="group", **kw)
        assert adv.abs().max().item() <= 1e-6, f"equal rewards {v} ({dtype}): max |A| = {adv.abs().max().item()}"


@pytest.mark.parametrize("est", ["grpo", "rloo", "canon"])
def test_equal_rewards_eps_zero_no_nan(est):
    """eps=0 is accepted; a group of one or of equal rewards must still give 0, never NaN (0 / 0)."""
    r = _t([1.0, 1.0, 2.0, 0.0, 1.0])
    g = torch.tensor([0, 0, 1, 2, 2])
    kw = dict(metric=_t([1.0, 2.0, 3.0, 4.0, 5.0])) if est == "canon" else {}
    adv, _ = group_advantages(r, g, estimator=est, scale="group", eps=0.0, **kw)
    assert not torch.isnan(adv).any(), adv
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- random vs. a pure-Python oracle


def _oracle(rewards, groups, est, scale, eps, lam, metric):
    valid = [not math.isnan(r) for r in rewards]
    members = {}
    for i, (g, ok) in enumerate(zip(groups, valid)):
        if ok:
            members.setdefault(g, []).append(i)
    def std(xs):
        return statistics.stdev(xs) if len(xs) > 1 else 0.0
    allv = [r for r, ok in zip(rewards, valid) if ok]
    out = []
    for i, (r, g, ok) in enumerate(zip(rewards, groups, valid)):
        if not ok:
            out.append(0.0)
            continue
        rs = [rewards[j] for j in members[g]]
        mean = statistics.fmean(rs)
        if est in ("grpo", "dr_grpo"):
            c = r - mean
        elif est == "rloo":
            others = [rewards[j] for j in members[g] if j != i]
            c = r - statistics.fmean(others) if others else 0.0
        elif est == "w_reinforce":
            c = lam * r - (1 - r)
        else:
            ms = sorted(metric[j] for j in members[g])
            med = ms[(len(ms) - 1) // 2]  # lower median
            hi = metric[i] > med
            other = [rewards[j] for j in members[g] if (metric[j] > med) != hi]
            c = r - (statistics.fmean(other) if other else mean)
        if scale == "group":
            c = c / (std(rs) + eps) if std(rs) > 0 else c
        elif scale == "batch":
            c = c / (std(allv) + eps) if std(allv) > 0 else c
        out.append(c)
    return out


@pytest.mark.parametrize("est,scale", CASES)
def test_random_against_python_oracle(est, scale):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for _ in range(5):
        b = rng.choice([1, 2, 9, 31, 64])
        groups = [rng.choice([-3, 0, 2, 11, 12, 40]) for _ in range(b)]
        rewards = [NAN if rng.random() < 0.2 else rng.choice([0.0, 1.0, rng.random(), rng.uniform(-3, 3)])
                   for _ in range(b)]
        metric = [float(rng.randrange(6)) for _ in range(b)]
        lam = rng.uniform(0.05, 1.0)
        adv, valid = group_advantages(_t(rewards), torch.tensor(groups), estimator=est, scale=scale, eps=1e-3,
                                      positive_weight=lam, metric=_t(metric) if est == "canon" else None)
        exp = _oracle(rewards, groups, est, scale, 1e-3, lam, metric)
        assert not torch.isnan(adv).any(), f"seed={seed}"
        torch.testing.assert_close(adv, _t(exp), rtol=1e-9, atol=1e-9, msg=f"seed={seed} {rewards} {groups}")
