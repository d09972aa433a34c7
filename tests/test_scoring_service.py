"""Streaming scorer and ScoringService: fault tolerance, groups, error-rate stop, cache, the score command."""

import asyncio
import json
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from judge_server import Faults, JudgeServer, default_verdict  # noqa: E402

from rubric_fast.judges import CountingJudge, Verdict  # noqa: E402
from rubric_fast.rubric import Aggregation, Criterion, Rubric, load_rubrics  # noqa: E402
from rubric_fast.scoring import (  # noqa: E402
    ScorerConfig,
    ScoringError,
    ScoringService,
    StreamingScorer,
    build_judge,
    build_service,
)

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples", "rubrics")
WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "melon"]


def fruit_rubric(i: int) -> Rubric:
    rng = random.Random(i)
    ws = rng.sample(WORDS, 5)
    crit = [Criterion(f"c{k}", f"Mentions {w}.", weight=float(k + 1)) for k, w in enumerate(ws)]
    crit[4].polarity, crit[4].category = "penalize_if_met", "pitfall"
    return Rubric(f"r{i}", [{"role": "user", "content": f"fruit {i}?"}], crit, aggregation=Aggregation("weighted_mean"))


def expected_reward(rubric: Rubric, response: str) -> float:
    num = den = 0.0
    for c in rubric.criteria:
        met = default_verdict(c.text, response)
        good = met if c.polarity == "reward_if_met" else not met
        num += c.weight * good
        den += c.weight
    return num / den


def test_1000_rollouts_with_10pct_faults_all_scored_or_explicitly_failed():
    faults = Faults(p_429=0.03, p_500=0.025, p_timeout=0.005, p_malformed=0.02, p_drop=0.01, p_bad_body=0.01,
                    retry_after=0.02, timeout_sleep_s=2.5)
    rng = random.Random(0)
    with JudgeServer(latency_s=0.001, faults=faults, seed=1) as server:
        cfg = {"judge": {"type": "http", "model": "m", "endpoints": [server.url], "mode": "batch", "batch_size": 5,
                         "concurrency": 16, "timeout_s": 2.0, "retries": 6, "backoff_base_s": 0.01,
                         "backoff_max_s": 0.1},
               "group_size": 4, "min_valid": 2, "deadline_s": 20, "max_error_rate": 1.0}
        truth = {}
        with build_service(cfg) as svc:
            for i in range(1000):
                rubric = fruit_rubric(i // 4)
                resp = " ".join(rng.sample(WORDS, 3)) + (" POISON" if i % 50 == 7 else "")
                truth[str(i)] = (rubric, resp)
                svc.submit(i // 4, str(i), rubric, resp)
            groups = list(svc.iter_groups(timeout=None))
            m = svc.metrics()
    members = [mm for g in groups for mm in g.members]
    assert len(groups) == 250 and len(members) == 1000 and m["groups_dropped"] == 0
    assert m["rollouts_done"] == 1000
    n_failed = 0
    for mm in members:
        rubric, resp = truth[mm.rollout_id]
        if "POISON" in resp:
            assert mm.reward is None and mm.error, mm
        if mm.reward is None:
            n_failed += 1
            assert mm.error and any(v.score is None and v.error for v in mm.verdicts)
        else:
            assert mm.reward == pytest.approx(expected_reward(rubric, resp)), (mm, resp)
    assert n_failed == m["rollouts_failed"] >= 20
    assert n_failed <= 30  # the 20 poisoned ones, plus at most a few unlucky ones
    assert m["retries"] > 50 and m["parse_failures"] > 0 and m["call_errors"]["rate_limited"] > 0
    assert m["latency_p50_s"] is not None and m["latency_p95_s"] >= m["latency_p50_s"]
    assert m["tokens"] > 0
    assert server.counts["429"] > 0 and server.counts["timeout"] > 0 and server.counts["drop"] > 0


class ScriptedJudge:
    """Verdict per (rollout, criterion) from a dict; None entries fail."""
    name = "scripted"
    holistic = False

    def __init__(self, table, delay=0.0):
        self.table, self.delay = table, delay

    async def grade(self, req):
        if self.delay:
            await asyncio.sleep(self.delay)
        out = []
        for c in req.criteria:
            s = self.table.get(req.response, 1.0)
            out.append(Verdict(c.id, s, "ok") if s is not None else Verdict(c.id, None, "", "server: boom"))
        return out


R = Rubric("r", [{"role": "user", "content": "q"}], [Criterion("a", "a"), Criterion("b", "b")])


def test_groups_release_when_complete_and_drop_below_min_valid():
    judge = ScriptedJudge({"apple": 1.0, "pear": 0.0, "plum": None})
    with ScoringService(judge, ScorerConfig(group_size=3, min_valid=2, max_error_rate=1.0)) as svc:
        svc.submit("g1", "1", R, "apple")
        svc.submit("g1", "2", R, "plum")
        assert svc.ready_groups(timeout=0.3) == []  # g1 still waits for its third member
        svc.submit("g1", "3", R, "pear")
        svc.submit("g2", "4", R, "plum")
        svc.submit("g2", "5", R, "plum")
        svc.submit("g2", "6", R, "apple")
        svc.submit("g3", "7", R, "apple", group_size=5)
        svc.close_group("g3")
        got = {g.group_id: g for g in svc.iter_groups(timeout=None)}
        m = svc.metrics()
    assert set(got) == {"g1"}  # g2 has one valid member, g3 one: both dropped
    assert got["g1"].rewards == [1.0, None, 0.0]
    assert got["g1"].members[1].error and "b" in got["g1"].members[1].error
    assert m["groups_dropped"] == 2 and m["groups_released"] == 1


def test_error_rate_threshold_stops_with_clear_message():
    judge = ScriptedJudge({"plum": None})
    svc = ScoringService(judge, ScorerConfig(group_size=1, min_valid=1, max_error_rate=0.3, error_min_samples=10,
                                             error_window=20))
    try:
        # the threshold may be crossed while submitting (the judge is fast) or while collecting
        with pytest.raises(ScoringError, match=r"error rate .* exceeds scoring.max_error_rate=0.3.*server: boom"):
            for i in range(40):
                svc.submit(i, str(i), R, "plum" if i % 2 else "apple")
            for _ in range(100):
                svc.ready_groups(timeout=0.05)
        with pytest.raises(ScoringError):
            svc.submit(99, "99", R, "apple")
    finally:
        svc.close()


def test_deadline_fails_slow_judgements_as_none():
    judge = ScriptedJudge({}, delay=5.0)

    async def go():
        s = StreamingScorer(judge, ScorerConfig(deadline_s=0.2))
        return await s.score("x", R, "apple pie")
    r = asyncio.run(go())
    assert r.reward is None and r.error and all(v.error.startswith("deadline") for v in r.verdicts)


def test_cache_reused_on_resume_and_judge_not_asked_again(tmp_path):
    rubrics = load_rubrics(os.path.join(EXAMPLES, "tiny_default.jsonl"))
    db = tmp_path / "verdicts.sqlite"
    responses = ["A short sentence about the apple.", "123 zzz", "The sea is calm and blue tonight."]

    def run(n_rubrics):
        counter = CountingJudge(build_judge({"type": "rule"}, guard=False))
        with build_service({"cache_path": str(db), "group_size": 3, "min_valid": 1}, judge=counter) as svc:
            for i, r in enumerate(rubrics[:n_rubrics]):
                for k, resp in enumerate(responses):
                    svc.submit(i, f"{i}-{k}", r, resp)
            groups = {g.group_id: g for g in svc.iter_groups(timeout=None)}
            return counter, groups, svc.metrics()

    c1, g1, m1 = run(4)
    assert c1.criteria_requested == 4 * 3 * 5 and m1["cache_hits"] == 0
    c2, g2, m2 = run(6)  # resume with two more prompts
    assert c2.criteria_requested == 2 * 3 * 5 and m2["cache_hits"] == 4 * 3 * 5
    assert all(n == 1 for n in c2.requested.values())
    assert not any(k[0].startswith(("0-", "1-", "2-", "3-")) for k in c2.requested)
    for gid in range(4):
        assert g1[gid].rewards == g2[gid].rewards
        assert all(v.cached for mm in g2[gid].members for v in mm.verdicts)


def test_cache_concurrent_writers(tmp_path):
    import threading

    from rubric_fast.scoring import VerdictCache

    path = tmp_path / "c.sqlite"
    caches = [VerdictCache(path) for _ in range(4)]

    def write(ci):
        for i in range(100):
            caches[ci].put(f"k{ci}-{i}", [Verdict("a", 1.0, "r")])
    ts = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert len(VerdictCache(path)) == 400
    assert VerdictCache(path).get("k3-99")[0].cached
    assert VerdictCache(path).put("x", [Verdict("a", None, "", "boom")]) is False  # failures are never cached


def test_tiny_default_rewards_spread_with_rule_judge():
    rubrics = load_rubrics(os.path.join(EXAMPLES, "tiny_default.jsonl"))
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz     .0123"

    async def go():
        s = StreamingScorer(build_judge({"type": "rule"}, guard=False), ScorerConfig())
        out = []
        for r in rubrics:
            text = "".join(rng.choice(alphabet) for _ in range(40))
            out.append((await s.score("x", r, text)).reward)
        good = await s.score("y", rubrics[0], f"A {rubrics[0].criteria[0].verifier_params['text']} is here.")
        return out, good.reward
    rand, good = asyncio.run(go())
    assert all(x is not None for x in rand)
    assert 0.05 < sum(rand) / len(rand) < 0.9 and len(set(rand)) >= 3  # partial credit, room to improve
    assert good == 1.0


def test_build_judge_config_errors():
    with pytest.raises(ValueError, match="judge.type: got 'oracle'; accepted: rule, http, hf, embedding"):
        build_judge({"type": "oracle"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['modle'\]"):
        build_judge({"type": "http", "modle": "x", "endpoints": ["http://a/v1"]})
    with pytest.raises(ValueError, match="judge.endpoints: required"):
        build_judge({"type": "http", "model": "x"})
    with pytest.raises(ValueError, match="scoring.max_error_rate"):
        build_service({"judge": {"type": "rule"}, "max_error_rate": 3})


def test_score_command_prints_pass_rates(tmp_path, capsys):
    from rubric_fast.scoring import command

    data = tmp_path / "data.jsonl"
    rows = [{"rubric_id": "tiny-00", "response": "An apple a day."},
            {"rubric_id": "tiny-00", "response": "..."},
            {"index": 1, "response": "The river 42"}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    import argparse
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    args = p.parse_args([str(data), "--rubrics", os.path.join(EXAMPLES, "tiny_default.jsonl"),
                         "--cache", str(tmp_path / "c.sqlite"), "--out", str(tmp_path / "out.jsonl")])
    assert command.run(args) == 0
    out = capsys.readouterr().out
    assert "has_word" in out and "responses: 3  judged: 2  guarded: 1  failed: 0" in out
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert lines[0]["reward"] == 1.0 and lines[1]["guarded"] and lines[1]["reward"] == 0.0
    assert command.run(args) == 0
    assert "cache hits: 10" in capsys.readouterr().out
