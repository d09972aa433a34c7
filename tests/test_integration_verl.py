"""verl-style compute_score, tested as a plain function (verl is not needed)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from rubric_fast.integrations import rubric_from_value
from rubric_fast.integrations import verl as rv
from rubric_fast.rubric import RubricError, load_rubrics

ROOT = Path(__file__).resolve().parents[1]
SPIDER = {"prompt": "How many legs does a spider have?", "criteria": [
    {"id": "eight", "text": "Says eight.", "weight": 2, "verifier": "regex",
     "verifier_params": {"pattern": r"\b(8|eight)\b"}},
    {"id": "short", "text": "At most 6 words.", "verifier": "length", "verifier_params": {"max": 6}},
]}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("RUBRIC_FAST_VERL_SCORER", "RUBRIC_FAST_VERL_ON_FAILURE", "RUBRIC_FAST_VERL_DETAILS"):
        monkeypatch.delenv(k, raising=False)
    rv.configure(None)


def test_rubric_in_ground_truth_via_verl_row():
    row = rv.verl_row(SPIDER, data_source="demo")
    gt, extra = row["reward_model"]["ground_truth"], row["extra_info"]
    assert isinstance(gt, str) and row["prompt"] == [{"role": "user", "content": SPIDER["prompt"]}]
    assert rv.compute_score("demo", "It has 8 legs.", gt, extra) == pytest.approx(1.0)
    assert rv.compute_score("demo", "Spiders have six legs, like every insect.", gt, extra) == pytest.approx(0.0)
    assert rv.compute_score("demo", "It has eight legs, I believe, like every spider.", gt,
                            extra) == pytest.approx(2 / 3)
    # the dict form of ground_truth works too (a verl row read back without JSON)
    assert rv.compute_score("demo", "8", SPIDER) == pytest.approx(1.0)


def test_rubric_in_extra_info_with_plain_reference_answer():
    # numeric check without an answer: compares with the reference answer = verl's ground_truth
    crit = [{"id": "num", "text": "Final answer equals the reference.", "verifier": "numeric"}]
    assert rv.compute_score("math", "so the answer is 84", "84", {"rubric": crit}) == pytest.approx(1.0)
    assert rv.compute_score("math", "so the answer is 85", "84", {"rubric": json.dumps(crit)}) == pytest.approx(0.0)


def test_verl_sample_parquet_rubrics_round_trip():
    rubrics = load_rubrics(ROOT / "examples" / "rubrics" / "verl_sample.parquet")
    row = rv.verl_row(rubrics[0])
    again = rubric_from_value(row["reward_model"]["ground_truth"])
    assert [(c.text, c.weight, c.polarity) for c in again.criteria] == \
        [(c.text, c.weight, c.polarity) for c in rubrics[0].criteria]
    assert again.aggregation == rubrics[0].aggregation and again.reference_answer == rubrics[0].reference_answer


def test_failed_judgement_raises_by_default_or_returns_nan():
    llm_only = {"criteria": [{"id": "kind", "text": "The response is kind."}]}  # no LLM judge configured
    with pytest.raises(rv.RubricJudgementFailed, match="no judge configured for verifier 'llm'.*on_failure='nan'"):
        rv.compute_score("x", "sunflowers", llm_only)
    assert math.isnan(rv.compute_score("x", "sunflowers", llm_only, on_failure="nan"))
    with pytest.raises(ValueError, match="on_failure"):
        rv.compute_score("x", "sunflowers", SPIDER, on_failure="zero")


def test_details_have_the_same_numeric_keys_for_every_sample(monkeypatch):
    monkeypatch.setenv("RUBRIC_FAST_VERL_ON_FAILURE", "nan")
    monkeypatch.setenv("RUBRIC_FAST_VERL_DETAILS", "1")
    ok = rv.compute_score("x", "8 legs", SPIDER)
    bad = rv.compute_score("x", "8 legs", {"criteria": [{"text": "kind"}]})
    assert ok.keys() == bad.keys() == {"score", "rubric_failed", "rubric_n_criteria", "rubric_n_met"}
    assert ok == {"score": 1.0, "rubric_failed": 0.0, "rubric_n_criteria": 2.0, "rubric_n_met": 2.0}
    assert bad["rubric_failed"] == 1.0 and math.isnan(bad["score"])
    assert all(isinstance(v, float) for v in ok.values())


def test_batch_and_async_forms():
    gt = json.dumps(SPIDER)
    out = rv.compute_score_batch(["x"] * 3, ["8", "six", "eight legs"], [gt] * 3, [None] * 3)
    assert out == [pytest.approx(1.0), pytest.approx(1 / 3), pytest.approx(1.0)]
    assert asyncio.run(rv.compute_score_async("x", "8", gt)) == pytest.approx(1.0)


def test_judge_is_configurable_by_env_kwarg_and_configure(monkeypatch, tmp_path):
    monkeypatch.setenv("RUBRIC_FAST_VERL_SCORER", json.dumps({"judge": {"type": "nope"}}))
    with pytest.raises(ValueError, match="judge.type"):
        rv.compute_score("x", "8", SPIDER)
    cfg = tmp_path / "scorer.yaml"
    cfg.write_text("judge:\n  type: rule\ndeadline_s: 30\n")
    monkeypatch.setenv("RUBRIC_FAST_VERL_SCORER", str(cfg))
    assert rv.compute_score("x", "8", SPIDER) == pytest.approx(1.0)
    # the keyword (verl's reward_kwargs) wins over the environment
    monkeypatch.setenv("RUBRIC_FAST_VERL_SCORER", json.dumps({"judge": {"type": "nope"}}))
    assert rv.compute_score("x", "8", SPIDER, scorer_config={"judge": {"type": "rule"}}) == pytest.approx(1.0)
    rv.configure({"judge": {"type": "rule"}, "guard": False})
    assert rv.compute_score("x", "8", SPIDER) == pytest.approx(1.0)


def test_missing_or_malformed_rubric_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no rubric: put a rubric record .*extra_info\['rubric'\]"):
        rv.compute_score("x", "8", "8", {"index": 3})
    with pytest.raises(RubricError, match=r"extra_info\['rubric'\]"):
        rv.compute_score("x", "8", "8", {"rubric": {"criteria": [{"id": "a"}]}})
