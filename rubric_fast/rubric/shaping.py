"""Rubicon-style aggregation: per-dimension saturation and a final shaping function (pure functions).

Huang et al. 2025, "Reinforcement Learning with Rubric Anchors" (Rubicon, arXiv:2508.12790): a rubric is a
set of critic dimensions, each with a criterion, ordered score tiers and a weight; the scores are combined
with veto mechanisms, *saturation-aware aggregation* (diminishing returns, so that no single dimension can
be over-optimized) and *targeted reward shaping* (a non-linear map that widens differences among high
scores). The paper names these strategies without fixing one formula; the ones below are ours, written
down in docs/methods.md:

    g_k      goodness of criterion k in [0, 1] (its tier score, polarity applied)
    s_d      = sum_{k in d} w_k g_k              score of dimension d (a criterion, or all criteria of a category)
    W_d      = sum_{k in d} w_k                  its maximum
    sat(s)   = s | min(s, cap) | 1 - exp(-s / tau)
    R0       = sum_d sat(s_d) / sum_d sat(W_d)   in [0, 1] (sat is increasing, so sat(s_d) <= sat(W_d))
    R        = R0 | R0 ** p | (exp(alpha R0) - 1) / (exp(alpha) - 1)

Vetoes and hard-rule gates (rubric_fast.rubric.aggregate) act before all of this: a vetoed response is 0.
"""

from __future__ import annotations

import math

SATURATIONS = ("none", "cap", "exp")
SHAPINGS = ("none", "power", "exp")
DIMENSION_KEYS = ("criterion", "category")


def saturate(s: float, kind: str, *, cap: float = 1.0, tau: float = 1.0) -> float:
    """Diminishing returns of one dimension's weighted score ``s >= 0``."""
    if kind == "none":
        return s
    if kind == "cap":
        return min(s, cap)
    if kind == "exp":
        return 1.0 - math.exp(-s / tau)
    raise ValueError(f"saturation must be one of {', '.join(SATURATIONS)}; got {kind!r}")


def shape(r: float, kind: str, *, power: float = 2.0, alpha: float = 3.0) -> float:
    """Map R0 in [0, 1] to [0, 1], increasing, fixing 0 and 1; ``power`` (p > 1) and ``exp`` (alpha > 0) are
    convex, so the slope is largest near 1: equal steps among high scores become larger reward gaps."""
    if kind == "none":
        return r
    if kind == "power":
        return r ** power
    if kind == "exp":
        return math.expm1(alpha * r) / math.expm1(alpha)
    raise ValueError(f"shaping must be one of {', '.join(SHAPINGS)}; got {kind!r}")


def rubicon_score(items: list[tuple[str, float, float]], *, saturation: str = "none", cap: float = 1.0,
                  tau: float = 1.0, shaping: str = "none", power: float = 2.0,
                  alpha: float = 3.0) -> tuple[float | None, dict]:
    """``items``: (dimension key, weight w_k >= 0, goodness g_k in [0, 1]) per criterion. Returns (R, detail);
    R is None when the total saturated weight is 0 (nothing to score)."""
    s: dict[str, float] = {}
    w: dict[str, float] = {}
    for key, weight, good in items:
        s[key] = s.get(key, 0.0) + weight * good
        w[key] = w.get(key, 0.0) + weight
    num = sum(saturate(v, saturation, cap=cap, tau=tau) for v in s.values())
    den = sum(saturate(v, saturation, cap=cap, tau=tau) for v in w.values())
    detail = {"dimensions": {k: {"score": s[k], "max": w[k]} for k in s}}
    if den <= 0:
        return None, detail
    r0 = num / den
    detail["saturated"] = r0
    return shape(r0, shaping, power=power, alpha=alpha), detail
