"""Judge audit: canaries measure false passes / false fails per endpoint; a gullible judge stops the run,
a gullible endpoint among honest ones is drained; canaries never reach a reward, a group or the counters."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from judge_server import JudgeServer  # noqa: E402

from rubric_fast.judges import Verdict  # noqa: E402
from rubric_fast.rubric import Criterion, Rubric  # noqa: E402
from rubric_fast.scoring import ScorerConfig, ScoringError, StreamingScorer, build_service  # noqa: E402

MATH = Rubric("m", [{"role": "user", "content": "What is 17 x 23?"}],
              [Criterion("product", "The response gives the product 391."),
               Criterion("rule", "has digits", verifier="rule", verifier_params={"check": "regex", "pattern": "[0-9]"})],
              reference_answer="17 x 23 = 391")
AUDIT = {"audit_rate": 1.0, "audit_min_samples": 6, "audit_max_false_pass": 0.25}


class AlwaysMet:
    name = "always_met"
    holistic = False

    def __init__(self):
        self.seen: list[str] = []

    async def grade(self, req):
        self.seen.append(req.response)
        return [Verdict(c.id, 1.0, "met") for c in req.criteria]


class Strict:
    """Met only when the response holds the number the criterion asks for."""
    name = "strict"
    holistic = False

    async def grade(self, req):
        return [Verdict(c.id, 1.0 if "391" in req.response else 0.0, "") for c in req.criteria]


def _run(judge, n: int, **cfg):
    scorer = StreamingScorer(judge, ScorerConfig(**{**AUDIT, **cfg}))

    async def go():
        out = [await scorer.score(str(i), MATH, "17 x 23 = 391") for i in range(n)]
        await scorer.audit.drain()
        return out
    return scorer, asyncio.run(go())


def test_always_met_judge_is_caught_and_stops_the_run():
    judge = AlwaysMet()
    scorer, scored = _run(judge, 30)
    assert isinstance(scorer.fatal, ScoringError)
    assert "judge audit" in str(scorer.fatal) and "audit_max_false_pass=0.25" in str(scorer.fatal)
    m = scorer.metrics()
    assert m["audit_false_pass_rate"] == 1.0 and m["audit"]["local"]["false_pass_rate"] == 1.0
    # canaries reached the judge, but never a reward, a counter or the error window
    assert len(judge.seen) > 30 and any(r != "17 x 23 = 391" for r in judge.seen)
    assert [r.reward for r in scored] == [1.0] * 30
    assert m["rollouts_done"] == 30 and m["rollouts_failed"] == 0 and m["judge_requests"] == 30
    with pytest.raises(ScoringError, match="judge audit"):
        scorer.submit("g", "late", MATH, "391")


def test_strict_judge_has_no_false_passes_or_fails_and_runs_on():
    scorer, scored = _run(Strict(), 40)
    m = scorer.metrics()
    assert scorer.fatal is None
    assert m["audit_false_pass_rate"] == 0.0 and m["audit_false_fail_rate"] == 0.0
    assert m["audit_canary_verdicts"] >= 20  # junk and reference canaries both sent
    assert [r.reward for r in scored] == [1.0] * 40


def test_canaries_only_grade_model_judged_reward_if_met_criteria():
    judge = AlwaysMet()
    rule_only = Rubric("r", [{"role": "user", "content": "x"}], [MATH.criteria[1]])
    scorer = StreamingScorer(judge, ScorerConfig(**AUDIT))

    async def go():
        for i in range(10):
            await scorer.score(str(i), rule_only, "42")
        await scorer.audit.drain()
    asyncio.run(go())
    assert judge.seen == [] or all(r == "42" for r in judge.seen)
    assert scorer.metrics()["audit_canary_verdicts"] == 0


def test_audit_off_sends_nothing():
    judge = AlwaysMet()
    scorer, _ = _run(judge, 20, audit_rate=0.0)
    assert judge.seen == ["17 x 23 = 391"] * 20 and scorer.fatal is None


def test_gullible_endpoint_is_drained_while_an_honest_one_remains():
    fruit = Rubric("f", [{"role": "user", "content": "Name a fruit."}], [Criterion("c", "Mentions apple.")])
    with JudgeServer() as honest, JudgeServer(verdict=lambda criterion, response: True) as gullible:
        cfg = {"judge": {"type": "http", "model": "m", "endpoints": [honest.url, gullible.url], "concurrency": 4},
               **AUDIT, "group_size": 1, "min_valid": 1}
        with build_service(cfg) as svc:
            for i in range(40):
                svc.submit(i, str(i), fruit, "an apple")
            groups = list(svc.iter_groups(timeout=None))
            asyncio.run_coroutine_threadsafe(svc.scorer.audit.drain(), svc._loop).result(30)
            m = svc.metrics()
            after_drain = gullible.counts["requests"]
            for i in range(40, 60):
                svc.submit(i, str(i), fruit, "an apple")
            more = list(svc.iter_groups(timeout=None))
    gl = gullible.url.split("://", 1)[1]
    assert m["audit_drained"] == [gl.rstrip("/")]
    assert m["audit"][gl.rstrip("/")]["false_pass_rate"] == 1.0
    assert m["audit"][honest.url.split("://", 1)[1].rstrip("/")]["false_pass_rate"] == 0.0
    assert svc.scorer.fatal is None
    # the real rollouts all scored 1 (the honest endpoint answers them), and canaries made no groups
    assert sorted(g.group_id for g in groups + more) == list(range(60))
    assert all(g.rewards == [1.0] for g in groups + more)
    # once drained, the gullible endpoint gets no traffic at all: neither rollouts nor canaries
    assert gullible.counts["requests"] == after_drain and honest.counts["requests"] >= 60


def test_audit_config_is_validated():
    with pytest.raises(ValueError, match="scoring.audit_rate"):
        ScorerConfig(audit_rate=2).validate()
    with pytest.raises(ValueError, match="scoring.audit_max_false_pass"):
        ScorerConfig(audit_max_false_pass=-0.1).validate()
    with pytest.raises(ValueError, match="scoring.audit_min_samples"):
        ScorerConfig(audit_min_samples=0).validate()


def test_trainer_metrics_carry_the_audit_rates_per_endpoint():
    from rubric_fast.trainer.rewards import ServiceScorer

    class Stub:
        def metrics(self):
            return {"audit_false_pass_rate": 0.5, "audit_false_fail_rate": None,
                    "audit": {"gpu1:8000/v1": {"false_pass_rate": 0.5, "false_fail_rate": 0.1, "drained": 1.0}}}

    m = ServiceScorer(Stub(), 4).metrics()
    assert m["judge/audit/false_pass_rate"] == 0.5 and "judge/audit/false_fail_rate" not in m
    assert m["judge/audit/gpu1:8000/v1/false_pass_rate"] == 0.5
    assert m["judge/audit/gpu1:8000/v1/drained"] == 1.0
