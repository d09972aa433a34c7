"""RLCR calibration reward: the response states its confidence, the reward is correctness plus a Brier term.

Damani et al. 2025, "Beyond Binary Rewards: Training LMs to Reason About Their Uncertainty" (RLCR,
arXiv:2507.16806):

    R = 1[correct] - (q - 1[correct]) ** 2          q in [0, 1]: the verbalized confidence

The Brier score is a bounded proper scoring rule, so the expected reward is maximized by the most likely
answer stated with its true probability of being correct. Here the response carries ``<tag>q</tag>``
(``reward.calibration.tag``); the judge sees the response with the tag removed, and "correct" is either the
rubric reward reaching ``correct_threshold`` or one criterion (``correct_criterion``, e.g. a rule check)
being met. A missing or malformed confidence (no tag, two tags, not a number in [0, 1]) is a *format
failure*: its reward is ``format_reward`` (not a judge failure; counted in ``calibration/format_failures``).
When the judgement itself failed, the reward is None (missing data), never a number.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from rubric_fast.settings import check_fields, setting

_TAG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass
class CalibrationConfig:
    """RLCR (Damani et al. 2025): the response states its confidence; the reward adds a Brier score (docs/methods.md)."""

    enabled: bool = setting(False, "RLCR: reward correctness plus a Brier score of the stated confidence")
    tag: str = setting("confidence", "the response ends with <confidence>0.8</confidence>",
                       check=lambda v: bool(_TAG_NAME.match(v)),
                       accepts="a tag name such as confidence (letters, digits, _ -)")
    correct_threshold: float = setting(0.5, "correct = rubric reward >= this (when no correct_criterion)",
                                       check=lambda v: 0.0 <= v <= 1.0, accepts="a number in [0, 1]")
    correct_criterion: str | None = setting(None, "correct = this criterion met (its verdict score >= 0.5)")
    format_reward: float = setting(-1.0, "reward of a response without one well-formed confidence")


def check_config(c: CalibrationConfig, key: str = "reward.calibration") -> None:
    """ValueError naming the key; the trainer's config turns it into a ConfigError."""
    check_fields(c, key + ".")
    if c.correct_criterion is not None and not c.correct_criterion.strip():
        raise ValueError(f"{key}.correct_criterion: expected a criterion id or null, got an empty string")


@dataclass
class Confidence:
    q: float | None          # the stated confidence, None on a format failure
    status: str              # ok | missing | malformed
    text: str                # the response with the confidence tag removed (what the judge sees)


def parse_confidence(text: str, tag: str) -> Confidence:
    """Exactly one ``<tag>number</tag>`` with the number in [0, 1]; anything else is a format failure."""
    pat = re.compile(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.S | re.I)
    hits = list(pat.finditer(text))
    stripped = pat.sub("", text).strip()
    if not hits:
        return Confidence(None, "missing", text.strip())
    if len(hits) > 1:
        return Confidence(None, "malformed", stripped)
    raw = hits[0].group(1).strip()
    try:
        q = float(raw)
    except ValueError:
        return Confidence(None, "malformed", stripped)
    if not math.isfinite(q) or not 0.0 <= q <= 1.0 or not re.fullmatch(r"[0-9.eE+-]+", raw):
        return Confidence(None, "malformed", stripped)
    return Confidence(q, "ok", stripped)


def rlcr_reward(correct: bool, q: float) -> float:
    c = 1.0 if correct else 0.0
    return c - (q - c) ** 2


def is_correct(cfg: CalibrationConfig, rubric_reward: float | None, verdicts) -> bool | None:
    """Correctness from the rubric, or None when the judgement that decides it failed or is missing."""
    if cfg.correct_criterion is not None:
        v = next((v for v in verdicts if v.criterion_id == cfg.correct_criterion), None)
        if v is None or v.score is None:
            return None
        return v.score >= 0.5
    if rubric_reward is None:
        return None
    return rubric_reward >= cfg.correct_threshold


def calibrated_reward(cfg: CalibrationConfig, response: str, rubric_reward: float | None,
                      verdicts) -> tuple[float | None, dict[str, Any]]:
    """(reward, info) for one response; info feeds the step metrics (see :func:`step_metrics`)."""
    conf = parse_confidence(response, cfg.tag)
    info: dict[str, Any] = {"confidence": conf.q, "format": conf.status, "rubric_reward": rubric_reward}
    if conf.q is None:
        return cfg.format_reward, info
    correct = is_correct(cfg, rubric_reward, verdicts)
    info["correct"] = correct
    if correct is None:
        return None, info
    return rlcr_reward(correct, conf.q), info


def judged_text(cfg: CalibrationConfig, response: str) -> str:
    """What the judge grades: the response without its confidence statement."""
    return parse_confidence(response, cfg.tag).text


def check_dataset(cfg: CalibrationConfig, rubrics, key: str = "reward.calibration.correct_criterion") -> None:
    if cfg.correct_criterion is None:
        return
    for r in rubrics:
        if all(c.id != cfg.correct_criterion for c in r.criteria):
            where = r.location or f"rubric {r.id!r}"
            raise ValueError(f"{key}: {where} has no criterion {cfg.correct_criterion!r} "
                             f"(its criteria: {', '.join(c.id for c in r.criteria)})")


def step_metrics(infos: list[dict[str, Any]]) -> dict[str, float]:
    """calibration/format_failures, /format_failure_rate, /confidence_mean, /accuracy, /brier (mean
    (q - 1[correct])^2 over responses with both), /overconfidence (mean q - accuracy)."""
    if not infos:
        return {}
    m: dict[str, float] = {}
    fails = sum(i["format"] != "ok" for i in infos)
    m["calibration/format_failures"] = float(fails)
    m["calibration/format_failure_rate"] = fails / len(infos)
    scored = [(i["confidence"], i["correct"]) for i in infos if i["format"] == "ok" and i.get("correct") is not None]
    if scored:
        qs = [q for q, _ in scored]
        cs = [1.0 if c else 0.0 for _, c in scored]
        m["calibration/confidence_mean"] = sum(qs) / len(qs)
        m["calibration/accuracy"] = sum(cs) / len(cs)
        m["calibration/brier"] = sum((q - c) ** 2 for q, c in zip(qs, cs)) / len(qs)
        m["calibration/overconfidence"] = m["calibration/confidence_mean"] - m["calibration/accuracy"]
    return m
