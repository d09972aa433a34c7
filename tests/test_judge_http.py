"""The http judge against a real OpenAI-compatible server on 127.0.0.1 (tests/judge_server.py)."""

import asyncio
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from judge_server import Faults, JudgeServer  # noqa: E402

from rubric_fast.judges import HOLISTIC_ID, JudgeRequest  # noqa: E402
from rubric_fast.judges.http import HttpJudge  # noqa: E402
from rubric_fast.rubric import Criterion  # noqa: E402

CRIT = [Criterion(f"c{i}", f"Mentions {w}.") for i, w in enumerate(["apple", "pear", "plum", "fig", "kiwi"])]
RESP = "I like apple and plum pie."
EXPECT = {"c0": 1.0, "c1": 0.0, "c2": 1.0, "c3": 0.0, "c4": 0.0}


def req(resp=RESP, crit=CRIT):
    return JudgeRequest("r1", [{"role": "user", "content": "fruit?"}], resp, crit)


def judge(server, **kw):
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("timeout_s", 2.0)
    return HttpJudge("test-model", [server.url] if not isinstance(server, list) else [s.url for s in server], **kw)


def grade(j, r):
    async def go():
        try:
            return await j.grade(r)
        finally:
            await j.aclose()
    return asyncio.run(go())


@pytest.mark.parametrize("mode", ["per_criterion", "batch"])
def test_modes_score_every_criterion(mode):
    with JudgeServer() as s:
        vs = grade(judge(s, mode=mode, batch_size=3), req())
        assert {v.criterion_id: v.score for v in vs} == EXPECT
        assert all(v.reason == "scripted" and v.error is None for v in vs)
        assert s.counts["requests"] == (5 if mode == "per_criterion" else 2)


def test_holistic_rating_and_think_stripping():
    with JudgeServer() as s:
        vs = grade(judge(s, mode="holistic"), req("<think>apple pear plum fig kiwi</think>I like apple."))
        assert len(vs) == 1 and vs[0].criterion_id == HOLISTIC_ID
        assert vs[0].score == round(1 + 9 * 1 / 5)  # only "apple" survives the think stripping
        assert "<think>" not in s.bodies[0]["messages"][1]["content"]


@pytest.mark.parametrize("fault", ["missing", "duplicate"])
def test_batch_missing_or_duplicate_ids_are_reasked_singly(fault):
    with JudgeServer(script=[fault]) as s:
        j = judge(s, mode="batch", batch_size=5)
        vs = grade(j, req())
        assert {v.criterion_id: v.score for v in vs} == EXPECT
        assert j.stats["batch_reasked_singly"] == (1 if fault == "missing" else 1)
        assert s.counts["requests"] == 2


def test_malformed_reply_reasked_then_none_after_two_reasks():
    with JudgeServer(script=["malformed", "ok"]) as s:
        j = judge(s)
        vs = grade(j, req(crit=CRIT[:1]))
        assert vs[0].score == 1.0 and j.stats["reasks"] == 1
        assert "could not be used" in s.bodies[1]["messages"][-1]["content"]
    with JudgeServer(script=["malformed"] * 3) as s:
        j = judge(s)
        vs = grade(j, req(crit=CRIT[:1]))
        assert vs[0].score is None and vs[0].error.startswith("parse") and "2 re-asks" in vs[0].error
        assert s.counts["requests"] == 3


def test_429_honours_retry_after_and_500_and_drops_are_retried():
    with JudgeServer(script=["429", "500", "drop", "bad_body", "ok"], faults=Faults(retry_after=0.3)) as s:
        j = judge(s, retries=5)
        vs = grade(j, req(crit=CRIT[:1]))
        assert vs[0].score == 1.0
        m = j.pool.metrics
        assert m.retries == 4 and m.errors["rate_limited"] == 1 and m.errors["server"] == 2
        assert m.errors["transport"] == 1
        assert j.pool.backoff(0, 0.3) >= 0.3  # Retry-After is a floor under the jittered backoff


def test_timeouts_and_exhausted_retries_fail_with_error_not_zero():
    with JudgeServer(script=["timeout", "timeout"], faults=Faults(timeout_sleep_s=1.0)) as s:
        j = judge(s, timeout_s=0.2, retries=1)
        vs = grade(j, req(crit=CRIT[:1]))
        assert vs[0].score is None and vs[0].error.startswith("timeout")
    with JudgeServer(script=["500"] * 10) as s:
        j = judge(s, retries=2)
        vs = grade(j, req(crit=CRIT[:1]))
        assert vs[0].score is None and "gave up after 2 retries" in vs[0].error
        assert s.counts["requests"] == 3


def test_api_key_from_env_sent_and_never_shown(monkeypatch):
    monkeypatch.setenv("RF_TEST_JUDGE_KEY", "sk-secret-123")
    with JudgeServer(script=["500"] * 10) as s:
        j = judge(s, api_key_env="RF_TEST_JUDGE_KEY", retries=0)
        vs = grade(j, req(crit=CRIT[:1]))
        assert s.auth_headers[0] == "Bearer sk-secret-123"
        assert "sk-secret" not in repr(j) and "sk-secret" not in j.identity and "sk-secret" not in vs[0].error
    monkeypatch.delenv("RF_TEST_JUDGE_KEY")
    with pytest.raises(ValueError, match="RF_TEST_JUDGE_KEY"):
        HttpJudge("m", ["http://127.0.0.1:1/v1"], api_key_env="RF_TEST_JUDGE_KEY")


def test_least_loaded_routing_spreads_over_endpoints():
    with JudgeServer(latency_s=0.05) as a, JudgeServer(latency_s=0.05) as b:
        j = judge([a, b], concurrency=8)

        async def go():
            try:
                return await asyncio.gather(*(j.grade(req()) for _ in range(8)))
            finally:
                await j.aclose()
        asyncio.run(go())
        assert a.counts["requests"] + b.counts["requests"] == 40
        assert min(a.counts["requests"], b.counts["requests"]) >= 15
