import pytest

from rubric_fast.judges.base import HOLISTIC_ID, Verdict
from rubric_fast.rubric import Aggregation, Criterion, Rubric, aggregate


def rub(criteria, **agg):
    return Rubric(id="r", prompt=[{"role": "user", "content": "q"}], criteria=criteria, aggregation=Aggregation(**agg))


def V(cid, s):
    return Verdict(cid, s, "")


HB = [Criterion("a", "a", 5), Criterion("b", "b", 3), Criterion("p", "p", 4, weight_raw=-4, polarity="penalize_if_met")]


def test_healthbench_formula_and_clip():
    r = rub(HB, method="healthbench", clip=True)
    assert aggregate(r, [V("a", 1), V("b", 0), V("p", 0)]).reward == pytest.approx(5 / 8)
    assert aggregate(r, [V("a", 1), V("b", 1), V("p", 1)]).reward == pytest.approx(4 / 8)
    assert aggregate(r, [V("a", 0), V("b", 0), V("p", 1)]).reward == 0.0
    unclipped = rub(HB, method="healthbench", clip=False)
    assert aggregate(unclipped, [V("a", 0), V("b", 0), V("p", 1)]).reward == pytest.approx(-4 / 8)


def test_weighted_mean_with_category_weights():
    cs = [Criterion("e", "e", 1, category="essential"), Criterion("o", "o", 1, category="optional"),
          Criterion("p", "p", 1, category="pitfall", polarity="penalize_if_met")]
    r = rub(cs, method="weighted_mean", category_weights={"essential": 1.0, "optional": 0.3, "pitfall": 0.9})
    res = aggregate(r, [V("e", 1), V("o", 0), V("p", 1)])
    assert res.reward == pytest.approx(1.0 / (1.0 + 0.3 + 0.9))
    assert res.detail["criteria"]["p"]["goodness"] == 0.0


def test_implicit_likert_maps_rating():
    r = rub([Criterion("a", "a")], method="implicit_likert")
    assert aggregate(r, [V(HOLISTIC_ID, 10)]).reward == 1.0
    assert aggregate(r, [V(HOLISTIC_ID, 1)]).reward == 0.0
    assert aggregate(r, [V(HOLISTIC_ID, 5.5)]).reward == pytest.approx(0.5)
    res = aggregate(r, [Verdict(HOLISTIC_ID, None, "", "parse: bad")])
    assert res.reward is None and "parse" in res.error


def test_veto_and_hard_rule_gate():
    cs = [Criterion("g", "g", 1, kind="hard_rule"), Criterion("x", "x", 1),
          Criterion("v", "v", 1, veto=True, polarity="penalize_if_met")]
    r = rub(cs, method="weighted_mean")
    assert aggregate(r, [V("g", 1), V("x", 1), V("v", 0)]).reward == 1.0
    res = aggregate(r, [V("g", 0), V("x", 1), V("v", 0)])
    assert res.reward == 0.0 and res.detail["gates_failed"] == ["g"]
    res = aggregate(r, [V("g", 1), V("x", 1), V("v", 1)])
    assert res.reward == 0.0 and res.detail["vetoed"] == ["v"]
    no_gate = rub(cs, method="weighted_mean", hard_rule_gate=False)
    assert aggregate(no_gate, [V("g", 0), V("x", 1), V("v", 0)]).reward == pytest.approx(2 / 3)


def test_failed_verdict_is_none_never_zero():
    r = rub(HB, method="healthbench")
    res = aggregate(r, [V("a", 1), Verdict("b", None, "", "timeout: x"), V("p", 0)])
    assert res.reward is None and "b" in res.error
    res = aggregate(r, [V("a", 1), V("p", 0)])  # missing verdict
    assert res.reward is None


def test_unknown_polarity_dropped_by_default():
    cs = [Criterion("a", "a", 1), Criterion("u", "u", 1, polarity="unknown", category="pitfall")]
    res = aggregate(rub(cs), [V("a", 1), V("u", 1)])
    assert res.reward == 1.0 and res.detail["dropped_unknown_polarity"] == ["u"]
    res = aggregate(rub(cs, unknown_polarity="penalize_if_met"), [V("a", 1), V("u", 1)])
    assert res.reward == 0.5
