"""From per-criterion verdicts to one reward (or None), with the per-criterion detail.

Formulas (``Aggregation.method``):

* ``healthbench`` (Arora et al. 2025, HealthBench): ``sum(points of met criteria) / sum(positive points)``,
  where penalize-if-met criteria carry negative points; clipped to [0, 1] per sample when ``clip``.
* ``weighted_mean``: ``sum(w_i * g_i) / sum(w_i)`` with ``g_i`` the *goodness* of criterion i
  (``score`` for reward-if-met, ``1 - score`` for penalize-if-met) and ``w_i`` its weight times the
  optional ``category_weights[category]`` (RaR's explicit aggregation, Gunjal et al. 2025). Hard rules
  that act as gates are left out of the mean.
* ``rubicon`` (Huang et al. 2025, Rubric Anchors): weighted goodness summed per dimension (a criterion, or
  all criteria of a category), each dimension saturated (``min(s, cap)`` or ``1 - exp(-s/tau)``), normalized
  by the saturated maxima, then shaped (``R0 ** p`` or an exponential) to widen differences among high
  scores; gates are left out of the sum as in ``weighted_mean``. Formulas: :mod:`rubric_fast.rubric.shaping`.
* ``implicit_likert``: one holistic 1-10 rating (verdict id ``__holistic__``) mapped linearly from
  ``[likert_min, likert_max]`` to [0, 1] and clipped (RaR's implicit aggregation).

On top of every method: a ``veto`` criterion whose outcome is bad (goodness < 0.5) makes the reward 0, and
so does a failed ``hard_rule`` when ``hard_rule_gate`` (OpenRubrics' hard rules as gates).

Any needed verdict that is missing or failed (``score is None``) makes the reward ``None`` with an error:
a failed judgement is never turned into 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .verdict import HOLISTIC_ID, Verdict

from .schema import Aggregation, Rubric
from .shaping import rubicon_score


@dataclass
class AggregateResult:
    reward: float | None
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _polarity(p: str, agg: Aggregation) -> str | None:
    if p != "unknown":
        return p
    return None if agg.unknown_polarity == "drop" else agg.unknown_polarity


def aggregate(rubric: Rubric, verdicts: Iterable[Verdict], aggregation: Aggregation | None = None) -> AggregateResult:
    agg = aggregation or rubric.aggregation
    by_id = {v.criterion_id: v for v in verdicts}
    per: dict[str, dict[str, Any]] = {}
    missing, dropped, vetoed, gates_failed = [], [], [], []
    num = den = 0.0
    dims: list[tuple[str, float, float]] = []  # rubicon: (dimension, weight, goodness)
    hb_num = hb_den = 0.0
    holistic_only = agg.method == "implicit_likert"

    for c in rubric.criteria:
        v = by_id.get(c.id)
        pol = _polarity(c.polarity, agg)
        gate = c.kind == "hard_rule" and agg.hard_rule_gate
        row: dict[str, Any] = {"weight": c.weight, "polarity": c.polarity, "category": c.category,
                               "kind": c.kind, "score": None if v is None else v.score,
                               "reason": "" if v is None else v.reason, "error": None if v is None else v.error}
        per[c.id] = row
        if pol is None:
            row["status"] = "dropped_unknown_polarity"
            dropped.append(c.id)
            continue
        if v is None:
            if holistic_only and not (c.veto or gate):
                row["status"] = "covered_by_holistic"
                continue
            row["status"] = "missing"
            missing.append(c.id)
            continue
        if v.score is None:
            row["status"] = "failed"
            missing.append(c.id)
            continue
        s = min(1.0, max(0.0, float(v.score)))
        good = s if pol == "reward_if_met" else 1.0 - s
        row["goodness"] = good
        row["status"] = "met" if s >= 0.5 else "not_met"
        if c.veto and good < 0.5:
            vetoed.append(c.id)
        if gate:
            if good < 0.5:
                gates_failed.append(c.id)
            if agg.method in ("weighted_mean", "rubicon"):
                continue
        w = c.weight * ((agg.category_weights or {}).get(c.category, 1.0))
        num += w * good
        den += w
        dims.append((c.id if agg.dimension_key == "criterion" else c.category, w, good))
        signed = c.weight if pol == "reward_if_met" else -c.weight
        hb_num += signed * s
        if signed > 0:
            hb_den += signed

    detail: dict[str, Any] = {"method": agg.method, "criteria": per}
    if dropped:
        detail["dropped_unknown_polarity"] = dropped
    if missing:
        detail["missing"] = missing
        return AggregateResult(None, detail, f"no verdict for criteria {missing}")
    if vetoed or gates_failed:
        detail["vetoed"], detail["gates_failed"] = vetoed, gates_failed
        return AggregateResult(0.0, detail)

    if agg.method == "implicit_likert":
        v = by_id.get(HOLISTIC_ID)
        if v is None or v.score is None:
            detail["holistic"] = None if v is None else {"error": v.error}
            return AggregateResult(None, detail, "no holistic rating" if v is None else (v.error or "failed rating"))
        r = (float(v.score) - agg.likert_min) / (agg.likert_max - agg.likert_min)
        detail["holistic"] = {"rating": v.score, "reason": v.reason}
        return AggregateResult(min(1.0, max(0.0, r)), detail)

    if agg.method == "healthbench":
        if hb_den <= 0:
            return AggregateResult(None, detail, "healthbench: no positive points among judged criteria")
        r = hb_num / hb_den
        detail["raw_score"] = r
        return AggregateResult(min(1.0, max(0.0, r)) if agg.clip else r, detail)

    if agg.method == "rubicon":
        if not dims and any(c.kind == "hard_rule" for c in rubric.criteria) and agg.hard_rule_gate:
            return AggregateResult(1.0, detail)  # only gates, and all passed
        r, rd = rubicon_score(dims, saturation=agg.saturation, cap=agg.saturation_cap, tau=agg.saturation_tau,
                              shaping=agg.shaping, power=agg.shaping_power, alpha=agg.shaping_alpha)
        detail["rubicon"] = rd
        if r is None:
            return AggregateResult(None, detail, "rubicon: total weight of judged criteria is 0")
        return AggregateResult(r, detail)

    # weighted_mean
    if den <= 0:
        if any(c.kind == "hard_rule" for c in rubric.criteria) and agg.hard_rule_gate:
            return AggregateResult(1.0, detail)  # only gates, and all passed
        return AggregateResult(None, detail, "weighted_mean: total weight of judged criteria is 0")
    return AggregateResult(num / den, detail)
