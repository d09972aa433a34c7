"""RLCR: R = 1[correct] - (q - 1[correct])^2, format failures, failed judgements, the loop's wiring."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from methods_helpers import run, scripted_engine  # noqa: E402

from rubric_fast.judges.base import Verdict  # noqa: E402
from rubric_fast.trainer.calibration import (  # noqa: E402
    CalibrationConfig,
    calibrated_reward,
    parse_confidence,
    rlcr_reward,
    step_metrics,
)
from rubric_fast.trainer.config import ConfigError, load_config  # noqa: E402


def test_rlcr_reward_by_hand():
    assert rlcr_reward(True, 1.0) == 1.0
    assert rlcr_reward(True, 0.8) == pytest.approx(1 - 0.04)
    assert rlcr_reward(False, 0.8) == pytest.approx(-0.64)
    assert rlcr_reward(False, 0.0) == 0.0
    assert rlcr_reward(True, 0.0) == 0.0
    # a proper scoring rule: with P(correct) = 0.7, stating q = 0.7 beats any other q in expectation
    expect = lambda q: 0.7 * rlcr_reward(True, q) + 0.3 * rlcr_reward(False, q)
    assert all(expect(0.7) > expect(q) for q in (0.0, 0.5, 0.69, 0.71, 0.9, 1.0))


@pytest.mark.parametrize("text,q,status,stripped", [
    ("a cat. <confidence>0.75</confidence>", 0.75, "ok", "a cat."),
    ("<Confidence> 1 </Confidence> yes.", 1.0, "ok", "yes."),
    ("a cat.", None, "missing", "a cat."),
    ("a cat. <confidence>high</confidence>", None, "malformed", "a cat."),
    ("a cat. <confidence>1.5</confidence>", None, "malformed", "a cat."),
    ("a cat. <confidence>nan</confidence>", None, "malformed", "a cat."),
    ("<confidence>0.2</confidence> a <confidence>0.9</confidence>", None, "malformed", "a"),
])
def test_parse_confidence(text, q, status, stripped):
    c = parse_confidence(text, "confidence")
    assert (c.q, c.status, c.text) == (q, status, stripped)


def test_calibrated_reward_threshold_criterion_format_and_failures():
    cfg = CalibrationConfig(enabled=True, correct_threshold=0.75, format_reward=-0.5)
    r, info = calibrated_reward(cfg, "x <confidence>0.6</confidence>", 0.8, [])
    assert r == pytest.approx(1 - 0.16) and info["correct"] is True
    r, info = calibrated_reward(cfg, "x <confidence>0.6</confidence>", 0.5, [])
    assert r == pytest.approx(-0.36) and info["correct"] is False
    assert calibrated_reward(cfg, "x", 1.0, [])[0] == -0.5            # no confidence: the format reward
    assert calibrated_reward(cfg, "x <confidence>0.6</confidence>", None, [])[0] is None  # judge failed
    by_rule = CalibrationConfig(enabled=True, correct_criterion="answer")
    ok = [Verdict("answer", 1.0, ""), Verdict("style", 0.0, "")]
    assert calibrated_reward(by_rule, "x <confidence>0.9</confidence>", 0.1, ok)[0] == pytest.approx(0.99)
    failed = [Verdict("answer", None, "", "timeout: x")]
    assert calibrated_reward(by_rule, "x <confidence>0.9</confidence>", None, failed)[0] is None
    m = step_metrics([{"format": "ok", "confidence": 0.9, "correct": True},
                      {"format": "ok", "confidence": 0.5, "correct": False},
                      {"format": "missing", "confidence": None}])
    assert m["calibration/format_failures"] == 1 and m["calibration/accuracy"] == 0.5
    assert m["calibration/brier"] == pytest.approx((0.01 + 0.25) / 2)
    assert m["calibration/overconfidence"] == pytest.approx(0.7 - 0.5)


def test_bad_keys_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"^reward.calibration.tag: got 'a b'"):
        load_config(None, ["reward.calibration.enabled=true", "reward.calibration.tag=a b"])
    with pytest.raises(ConfigError, match=r"^reward.calibration.correct_threshold:"):
        load_config(None, ["reward.calibration.correct_threshold=2"])
    cfg = load_config(None, ["reward.calibration.enabled=true", "reward.calibration.correct_criterion=nope",
                             f"logging.run_dir={tmp_path / 'r'}"])
    from rubric_fast.trainer.loop import load_data

    with pytest.raises(ConfigError, match=r"reward.calibration.correct_criterion: .*has no criterion 'nope'"):
        load_data(cfg)


def test_the_loop_strips_the_tag_for_the_judge_and_rewards_calibration(tmp_path, monkeypatch):
    # the default rubric: has the letter, ends with '.', 2-6 words, lowercase only
    texts = ["we see the sea. <confidence>0.9</confidence>",   # all 4 met: correct, q = .9 -> 0.99
             "WE SEE. <confidence>0.9</confidence>",           # 2 of 4 (period, words): 0.5 < 0.75 -> -0.81
             "we see the sea.",                                 # no confidence: format reward -1
             "we see the sea. <confidence>0.2</confidence>"]   # correct, q = .2 -> 1 - .64 = 0.36
    scripted_engine(monkeypatch, texts)
    _, rows = run(tmp_path, "reward.calibration.enabled=true", "reward.calibration.correct_threshold=0.75",
                  "data.prompts_per_step=1", "logging.samples_every=1", "logging.num_samples=4",
                  "data.shuffle=false")
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["reward"] for s in samples] == pytest.approx([0.99, -0.81, -1.0, 0.36])
    assert [s["extras"]["calibration"]["rubric_reward"] for s in samples] == pytest.approx([1.0, 0.5, 1.0, 1.0])
    last = rows[-1]
    assert last["calibration/format_failures"] == 1 and last["calibration/accuracy"] == pytest.approx(2 / 3)
    assert last["reward"] == pytest.approx((0.99 - 0.81 - 1.0 + 0.36) / 4)
