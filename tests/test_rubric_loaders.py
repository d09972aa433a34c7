import json
import math
from pathlib import Path

import pytest

from rubric_fast.rubric import (
    RubricError,
    detect_format,
    load_rubrics,
    parse_openrubrics_text,
    rubric_from_dict,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "rubrics"


@pytest.mark.parametrize("name,fmt,n", [
    ("healthbench_sample.jsonl", "healthbench", 2), ("rar_sample.jsonl", "rar", 2),
    ("verl_sample.parquet", "verl", 2), ("openrubrics_sample.jsonl", "openrubrics", 2),
    ("rubric_fast_sample.jsonl", "rubric_fast", 3), ("tiny_default.jsonl", "rubric_fast", None),
])
def test_every_sample_format_loads(name, fmt, n):
    path = EXAMPLES / name
    assert detect_format(path) == fmt
    rubrics = load_rubrics(path)
    if n is not None:
        assert len(rubrics) == n
    for r in rubrics:
        assert r.criteria and r.prompt and r.prompt[-1]["content"]
        assert r.source is not None and r.source_format == fmt
        assert all(c.weight >= 0 and math.isfinite(c.weight) for c in r.criteria)


def test_healthbench_negative_points_are_penalize_if_met():
    r = load_rubrics(EXAMPLES / "healthbench_sample.jsonl")[0]
    neg = [c for c in r.criteria if c.weight_raw < 0]
    assert neg and all(c.polarity == "penalize_if_met" and c.weight == -c.weight_raw for c in neg)
    assert r.aggregation.method == "healthbench"
    assert r.source["prompt_id"] == "hb-1"  # untouched source record


def test_rar_category_and_polarity(capsys):
    rs = load_rubrics(EXAMPLES / "rar_sample.jsonl")
    c = {cc.text: cc for cc in rs[0].criteria}
    assert c["States that water boils at 100 °C at sea level."].category == "essential"
    assert c["Does not confuse Celsius with Fahrenheit."].polarity == "reward_if_met"
    assert c["Claims that water boils faster at altitude because it is hotter."].polarity == "penalize_if_met"
    tone = [cc for cc in rs[1].criteria if cc.text.startswith("The answer is overly long")][0]
    assert tone.polarity == "unknown"
    err = capsys.readouterr().err
    assert "2 reward-if-met" in err and "1 penalize-if-met" in err and "1 unknown" in err


def test_openrubrics_items_and_continuations():
    crit = parse_openrubrics_text("1. [Hard Rule] Must be in French.\n2. Uses simple words [Principle]\n   and short"
                                  " sentences.")
    assert [c.kind for c in crit] == ["hard_rule", "principle"]
    assert crit[1].text == "Uses simple words and short sentences."
    assert crit[0].category == "essential"


def test_verl_reference_and_ids():
    rs = load_rubrics(EXAMPLES / "verl_sample.parquet")
    assert rs[0].id == "verl-1" and rs[0].reference_answer == "8"
    assert rs[0].criteria[1].polarity == "penalize_if_met"


def test_rule_shorthand_is_normalised():
    rs = load_rubrics(EXAMPLES / "rubric_fast_sample.jsonl")
    c = rs[0].criteria[1]
    assert c.verifier == "rule" and c.verifier_params["check"] == "regex"


GOOD = {"prompt": "hi", "criteria": [{"text": "says hello", "weight": 1}]}


def _write(tmp_path, records, name="bad.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return p


@pytest.mark.parametrize("bad,key,words", [
    ({"criteria": [{"text": "x"}]}, "prompt", "missing"),
    ({"prompt": "hi", "criteria": []}, "criteria", "no criteria"),
    ({"prompt": "hi", "criteria": [{"text": "x", "weight": float("nan")}]}, "criteria[0].weight", "finite"),
    ({"prompt": "hi", "criteria": [{"text": "x", "weight": -1}]}, "criteria[0].weight", ">= 0"),
    ({"prompt": "hi", "criteria": [{"text": "x", "verifier": "oracle"}]}, "criteria[0].verifier", "accepted"),
    ({"prompt": "hi", "criteria": [{"weight": 1}]}, "criteria[0].text", "missing"),
    ({"prompt": "hi", "criteria": [{"text": "x", "polarity": "sometimes"}]}, "criteria[0].polarity", "reward_if_met"),
    ({"prompt": "hi", "criteria": [{"text": "x", "verifier": "rule", "verifier_params": {"check": "telepathy"}}]},
     "criteria[0].verifier_params", "regex"),
    ({"prompt": "hi", "criteria": [{"text": "x", "verifier": "regex", "verifier_params": {"pattern": "("}}]},
     "criteria[0].verifier_params", "invalid regex"),
    ({"prompt": "hi", "criteria": [{"text": "x"}], "aggregation": {"method": "median"}}, "aggregation.method",
     "healthbench"),
])
def test_bad_rubric_fast_records_name_file_line_key(tmp_path, bad, key, words):
    p = _write(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(RubricError) as ei:
        load_rubrics(p, format="rubric_fast")
    msg = str(ei.value)
    assert f"{p}:3" in msg and f"'{key}'" in msg and words in msg, msg
    assert ei.value.line == 3 and ei.value.key == key


def test_bad_healthbench_and_rar_records(tmp_path):
    p = _write(tmp_path, [{"prompt": [{"role": "user", "content": "q"}],
                           "rubrics": [{"criterion": "a", "points": "NaN"}]}])
    with pytest.raises(RubricError, match=r"bad.jsonl:1: key 'rubrics\[0\].points': must be a finite"):
        load_rubrics(p, format="healthbench")
    p = _write(tmp_path, [{"question": "q", "rubric": [{"title": "t", "description": "Essential Criteria: x"}]}],
               "rar.jsonl")
    with pytest.raises(RubricError, match=r"rar.jsonl:1: key 'rubric\[0\].weight': missing"):
        load_rubrics(p, format="rar")
    p = _write(tmp_path, ['{"prompt": "x", "criteria": ['], "broken.jsonl")
    with pytest.raises(RubricError, match=r"broken.jsonl:1: invalid JSON"):
        load_rubrics(p)


def test_bad_parquet_names_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "ok", "reward_model": {"rubrics": [{"criterion": "a", "points": 1.0}]}},
            {"prompt": "ok", "reward_model": {"rubrics": []}}]
    p = tmp_path / "v.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    with pytest.raises(RubricError, match=r"v.parquet:2: key 'reward_model.rubrics': no criteria"):
        load_rubrics(p)


def test_unknown_format_is_explained(tmp_path):
    p = _write(tmp_path, [{"foo": 1}])
    with pytest.raises(RubricError, match="cannot tell the rubric format"):
        load_rubrics(p)


def test_rubric_from_dict_round_trip():
    r = rubric_from_dict({"id": "a", "prompt": [{"role": "user", "content": "x"}],
                          "criteria": [{"id": "k", "text": "t", "weight": 2, "tiers": [
                              {"score": 0, "description": "no"}, {"score": 1, "description": "yes"}]}]})
    assert r.criteria[0].tiers[1].score == 1.0 and r.criteria[0].weight == 2.0
