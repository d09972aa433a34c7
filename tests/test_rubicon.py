"""Rubicon aggregation (per-dimension saturation, final shaping, vetoes) and tiered judge verdicts."""

from __future__ import annotations

import asyncio
import math

import pytest

from rubric_fast.judges.base import JudgeRequest, Verdict
from rubric_fast.judges.hf import HFJudge
from rubric_fast.rubric import Aggregation, Criterion, Rubric, aggregate
from rubric_fast.rubric.schema import RubricError, Tier
from rubric_fast.rubric.shaping import rubicon_score, saturate, shape
from rubric_fast.trainer.config import ConfigError, load_config


def rub(criteria, **agg):
    return Rubric(id="r", prompt=[{"role": "user", "content": "q"}], criteria=criteria,
                  aggregation=Aggregation(method="rubicon", **agg))


def V(cid, s):
    return Verdict(cid, s, "")


TIERS = [Tier(0.0, "absent"), Tier(0.5, "partial"), Tier(1.0, "complete")]
CRIT = [Criterion("a", "a", 2.0, category="essential"),
        Criterion("b", "b", 1.0, category="essential", tiers=TIERS),
        Criterion("c", "c", 1.0, category="optional"),
        Criterion("d", "d", 3.0, category="optional", polarity="penalize_if_met")]
# goodness: a = 1, b = 0.5 (tier), c = 1, d = 1 - 1 = 0 (the pitfall happened)
VERDICTS = [V("a", 1.0), V("b", 0.5), V("c", 1.0), V("d", 1.0)]


def test_plain_rubicon_is_the_weighted_mean():
    # (2*1 + 1*0.5 + 1*1 + 3*0) / (2 + 1 + 1 + 3) = 3.5 / 7
    assert aggregate(rub(CRIT), VERDICTS).reward == pytest.approx(0.5)


def test_cap_saturation_per_category_by_hand():
    # dimensions by category: essential s = 2.5 (max 3), optional s = 1 (max 4); cap 2:
    # (min(2.5, 2) + min(1, 2)) / (min(3, 2) + min(4, 2)) = 3 / 4
    r = rub(CRIT, dimension_key="category", saturation="cap", saturation_cap=2.0)
    res = aggregate(r, VERDICTS)
    assert res.reward == pytest.approx(0.75)
    assert res.detail["rubicon"]["dimensions"]["essential"] == {"score": 2.5, "max": 3.0}


def test_exp_saturation_and_power_shaping_by_hand():
    # per criterion, tau = 2: sat(s) = 1 - exp(-s/2); then R0 ** 2
    r = rub(CRIT, saturation="exp", saturation_tau=2.0, shaping="power", shaping_power=2.0)
    sat = lambda s: 1 - math.exp(-s / 2)
    r0 = (sat(2) + sat(0.5) + sat(1) + sat(0)) / (sat(2) + sat(1) + sat(1) + sat(3))
    assert aggregate(r, VERDICTS).reward == pytest.approx(r0 ** 2)
    assert 0 < r0 ** 2 < r0 < 1


def test_shaping_widens_gaps_among_high_scores():
    for kind in ("power", "exp"):
        assert shape(0.0, kind) == 0.0 and shape(1.0, kind) == pytest.approx(1.0)
        high = shape(0.95, kind) - shape(0.85, kind)
        low = shape(0.15, kind) - shape(0.05, kind)
        assert high > 0.1 > low, kind  # the same 0.1 step is worth more near the top
    assert shape(0.5, "exp", alpha=3.0) == pytest.approx(math.expm1(1.5) / math.expm1(3.0))


def test_saturation_gives_diminishing_returns():
    assert saturate(5.0, "cap", cap=2.0) == 2.0 and saturate(1.0, "cap", cap=2.0) == 1.0
    assert saturate(1.0, "exp", tau=1.0) - saturate(0.0, "exp", tau=1.0) > \
        saturate(3.0, "exp", tau=1.0) - saturate(2.0, "exp", tau=1.0)
    assert rubicon_score([], saturation="cap")[0] is None


def test_veto_composes_with_saturation_and_shaping():
    crit = CRIT + [Criterion("v", "no insults", 1.0, veto=True, polarity="penalize_if_met")]
    r = rub(crit, saturation="cap", saturation_cap=1.5, shaping="exp")
    assert aggregate(r, VERDICTS + [V("v", 1.0)]).reward == 0.0
    ok = aggregate(r, VERDICTS + [V("v", 0.0)]).reward
    assert ok is not None and 0 < ok < 1


def test_failed_verdict_is_none_never_zero():
    res = aggregate(rub(CRIT, saturation="cap"), [V("a", 1.0), Verdict("b", None, "", "parse: bad"),
                                                  V("c", 1.0), V("d", 0.0)])
    assert res.reward is None and "b" in res.error


def test_bad_keys_are_refused_by_name():
    with pytest.raises(RubricError, match="aggregation.saturation"):
        Aggregation.from_dict({"method": "rubicon", "saturation": "log"})
    with pytest.raises(RubricError, match="aggregation.shaping_power"):
        Aggregation.from_dict({"method": "rubicon", "shaping": "power", "shaping_power": 0.5})
    with pytest.raises(RubricError, match="applies to method rubicon only"):
        Aggregation.from_dict({"method": "weighted_mean", "saturation": "cap"})
    with pytest.raises(ConfigError, match=r"^scoring.aggregation.saturation_tau: must be a finite"):
        load_config(None, ["scoring.aggregation={method: rubicon, saturation: exp, saturation_tau: 0}"])
    cfg = load_config(None, ["scoring.aggregation={method: rubicon, saturation: cap, saturation_cap: 2}"])
    assert cfg.scoring.aggregation["saturation"] == "cap"


def test_the_judge_is_asked_for_a_tier_and_the_verdict_is_its_score():
    seen = []

    def scripted(batch):
        out = []
        for msgs in batch:
            text = msgs[-1]["content"]
            seen.append(text)
            out.append('{"explanation": "half done", "tier": 1}' if "<tiers>" in text
                       else '{"explanation": "yes", "criteria_met": true}')
        return out

    for mode in ("per_criterion", "batch"):
        judge = HFJudge(generate_fn=scripted, mode=mode)
        req = JudgeRequest("r0", [{"role": "user", "content": "q"}], "resp", [CRIT[0], CRIT[1]])
        got = asyncio.run(judge.grade(req))
        assert [(v.criterion_id, v.score) for v in got] == [("a", 1.0), ("b", 0.5)], mode
    assert any("0. absent" in t and "2. complete" in t for t in seen)


def test_an_out_of_range_tier_is_reasked_then_a_failure():
    judge = HFJudge(generate_fn=lambda b: ['{"explanation": "x", "tier": 3}'] * len(b), max_reasks=1)
    req = JudgeRequest("r0", [{"role": "user", "content": "q"}], "resp", [CRIT[1]])
    (v,) = asyncio.run(judge.grade(req))
    assert v.score is None and v.error.startswith("parse") and judge.stats["reasks"] == 1
