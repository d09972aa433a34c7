"""Pairwise rubric judging: plans, order consistency, Bradley-Terry with ties and failures, the judges, the
trainer's scorer and one training step."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from methods_helpers import run, scripted_engine  # noqa: E402

from rubric_fast.judges.hf import HFJudge  # noqa: E402
from rubric_fast.judges.pairwise import ChatPairwiseJudge, PairVerdict, RulePairwiseJudge  # noqa: E402
from rubric_fast.rubric import Criterion, Rubric  # noqa: E402
from rubric_fast.rubric.pairwise import (  # noqa: E402
    bradley_terry,
    comparison_plan,
    consistent_outcome,
    pairwise_rewards,
    win_rate_rewards,
)
from rubric_fast.trainer.config import ConfigError, load_config  # noqa: E402
from rubric_fast.trainer.pairwise_scorer import PairwiseConfig, PairwiseScorer  # noqa: E402

sig = lambda x: 1 / (1 + math.exp(-x))


def degrees(n, pairs):
    d = [0] * n
    for i, j in pairs:
        assert i != j
        d[i] += 1
        d[j] += 1
    return d


def test_comparison_plans():
    assert comparison_plan(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    for n, k, want in ((8, 2, 2), (8, 3, 3), (8, 4, 4), (7, 4, 4), (7, 3, 2), (5, 9, 4)):
        pairs = comparison_plan(n, "round_robin", k, seed=3)
        assert len(set(pairs)) == len(pairs)
        assert degrees(n, pairs) == [want] * n, (n, k)
    assert comparison_plan(8, "round_robin", 2, seed=1) != comparison_plan(8, "round_robin", 2, seed=2)
    with pytest.raises(ValueError, match="at least 2"):
        comparison_plan(1)


def test_only_order_consistent_outcomes_are_kept():
    assert consistent_outcome("A", "B") == 1.0      # first shown wins in both orders
    assert consistent_outcome("B", "A") == 0.0
    assert consistent_outcome("tie", "tie") == 0.5
    assert consistent_outcome("A", "A") is None     # position bias: inconsistent -> missing
    assert consistent_outcome("A", "tie") is None
    assert consistent_outcome(None, "B") is None    # a failed call -> missing, never a loss


def test_bradley_terry_by_hand():
    # two members, 3 wins and 1 loss: plain MLE theta_0 - theta_1 = log 3, win rates 3/4 and 1/4
    res = [(0, 1, 1.0)] * 3 + [(0, 1, 0.0)]
    th = bradley_terry(2, res, prior=0.0)
    assert th[0] - th[1] == pytest.approx(math.log(3), abs=1e-8)
    assert win_rate_rewards(th) == pytest.approx([0.75, 0.25])
    # a tie is half a win each: one win and one tie = 1.5 : 0.5
    th = bradley_terry(2, [(0, 1, 1.0), (1, 0, 0.5)], prior=0.0)
    assert th[0] - th[1] == pytest.approx(math.log(3), abs=1e-8)
    # one win under the prior lam: theta_0 = -theta_1 = t with 1 - sigmoid(2t) = lam t (bisection oracle)
    lam = 0.1
    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - sig(2 * mid) - lam * mid > 0 else (lo, mid)
    th = bradley_terry(2, [(0, 1, 1.0)], prior=lam)
    assert th == pytest.approx([lo, -lo], abs=1e-8)
    # a cycle is a three-way draw
    th = bradley_terry(3, [(0, 1, 1.0), (1, 2, 1.0), (2, 0, 1.0)], prior=0.1)
    assert win_rate_rewards(th) == pytest.approx([0.5, 0.5, 0.5])


def test_missing_comparisons_leave_a_member_unrated_not_beaten():
    outcomes = {(0, 1): 1.0, (0, 2): None, (1, 2): None, (0, 3): 0.5, (1, 3): 0.0}
    rewards, theta = pairwise_rewards(4, outcomes, prior=0.1)
    assert rewards[2] is None and theta[2] is None
    assert all(r is not None for i, r in enumerate(rewards) if i != 2)
    assert sum(r for r in rewards if r is not None) == pytest.approx(3 / 2)  # win rates of 3 sum to 3/2
    assert rewards[1] < rewards[0] and rewards[1] < rewards[3]


RUB = Rubric("r", [{"role": "user", "content": "Write about e."}], [
    Criterion("gate", "Ends with a period.", 1.0, kind="hard_rule", verifier="rule",
              verifier_params={"check": "regex", "pattern": r"\.$"}),
    Criterion("e", "Has the letter e.", 2.0, verifier="rule", verifier_params={"check": "regex", "pattern": "e"}),
    Criterion("short", "At most 3 words.", 1.0, verifier="rule",
              verifier_params={"check": "length", "max": 3, "unit": "words"}),
])


def test_rule_pairwise_judge_gates_then_weighted_principles():
    j = RulePairwiseJudge()
    cmp = lambda a, b: asyncio.run(j.compare(RUB, a, b)).winner
    assert cmp("see me.", "see me") == "A"                 # only A keeps the hard rule
    assert cmp("xx", "see me now please") == "tie"        # both break it
    assert cmp("see me.", "xx yy.") == "A"                 # principles: 3 vs 1
    assert cmp("xx yy.", "eee eee eee eee.") == "B"        # 1 vs 2 (the heavier criterion)
    assert cmp("see.", "me.") == "tie"


def test_chat_pairwise_prompt_and_parser():
    seen = []

    def scripted(batch):
        out = []
        for msgs in batch:
            text = msgs[-1]["content"]
            seen.append(text)
            a = text.split("<response_A>")[1].split("</response_A>")[0]
            out.append('{"explanation": "x", "winner": "%s"}' % ("A" if "good" in a else "B"))
        return out

    j = ChatPairwiseJudge(HFJudge(generate_fn=scripted))

    async def both():
        return await j.compare(RUB, "good one.", "bad"), await j.compare(RUB, "bad", "good one.")

    ab, ba = asyncio.run(both())
    assert (ab.winner, ba.winner) == ("A", "B")
    assert "<hard_rules>\n- Ends with a period." in seen[0] and "<principles>\n- Has the letter e." in seen[0]
    bad = ChatPairwiseJudge(HFJudge(generate_fn=lambda b: ['{"winner": "C"}'] * len(b), max_reasks=1))
    v = asyncio.run(bad.compare(RUB, "a", "b"))
    assert v.winner is None and v.error.startswith("parse")


class BiasedJudge:
    """Always prefers the first response shown (position bias); fails on responses containing 'fail'."""

    async def compare(self, rubric, a, b, deadline=None):
        if "fail" in a or "fail" in b:
            return PairVerdict(None, "", "transport: down")
        return PairVerdict("A")


def test_scorer_drops_inconsistent_and_failed_comparisons_as_missing():
    sc = PairwiseScorer(BiasedJudge(), PairwiseConfig(enabled=True), 3)
    try:
        for k, t in enumerate(["one.", "two.", "three."]):
            sc.submit(7, f"7:{k}", RUB, t)
        got = sc.collect(7)
        assert [g.reward for g in got] == [None, None, None]       # every pair inconsistent: no data
        assert all("missing data" in g.error for g in got)
        m = sc.metrics()
        assert m["pairwise/inconsistent"] == 3 and m["pairwise/kept"] == 0
    finally:
        sc.close()
    sc = PairwiseScorer(RulePairwiseJudge(), PairwiseConfig(enabled=True), 3)
    try:
        for k, t in enumerate(["see me.", "", "xx."]):
            sc.submit(1, f"1:{k}", RUB, t)
        got = sc.collect(1)
        assert got[1].guard_reason == "empty" and got[1].reward < got[2].reward < got[0].reward
        assert [v.criterion_id for v in got[0].verdicts] == ["gate", "e", "short"]
        assert sc.metrics()["pairwise/consistency_rate"] == 1.0
    finally:
        sc.close()


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"^reward.pairwise.comparisons_per_response: got 5, but a group of "
                                          r"rollout.num_generations=4 has only 3"):
        load_config(None, ["reward.pairwise.enabled=true", "reward.pairwise.plan=round_robin",
                           "reward.pairwise.comparisons_per_response=5", "rollout.num_generations=4"])
    with pytest.raises(ConfigError, match=r"^reward.pairwise.plan: got 'swiss'"):
        load_config(None, ["reward.pairwise.plan=swiss"])
    with pytest.raises(ConfigError, match=r"^reward.calibration.enabled: RLCR needs a pointwise"):
        load_config(None, ["reward.pairwise.enabled=true", "reward.calibration.enabled=true"])
    with pytest.raises(ConfigError, match=r"^judge.type: pairwise judging .* got 'embedding'"):
        load_config(None, ["reward.pairwise.enabled=true", "judge={type: embedding}"])
    with pytest.raises(ConfigError, match=r"^rollout.num_generations: got 1"):
        load_config(None, ["reward.pairwise.enabled=true", "rollout.num_generations=1"])


def test_one_training_step_with_pairwise_rewards(tmp_path, monkeypatch):
    # default rubric (letter, '.', 2-6 words, lowercase): 4, 2, 3 and 1 criteria met -> a total order
    texts = ["we see the sea.", "WE SEE.", "we see thee", "WE SEE"]
    scripted_engine(monkeypatch, texts)
    _, rows = run(tmp_path, "reward.pairwise.enabled=true", "data.prompts_per_step=1", "logging.samples_every=1",
                  "logging.num_samples=4")
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    r = [s["reward"] for s in samples]
    assert r[0] > r[2] > r[1] > r[3] and sum(r) == pytest.approx(2.0)
    last = rows[-1]
    assert last["pairwise/comparisons"] == 6 and last["pairwise/kept"] == 6 and last["pairwise/judge_calls"] == 12
    assert last["pass_rate/has_letter"] == 0.5 and last["policy_version"] == 1


def test_http_pairwise_judge_against_an_openai_compatible_server():
    from judge_server import JudgeServer

    from rubric_fast.scoring.config import build_pairwise_judge

    # the scripted server prefers the response with more criterion keywords ("period", "e", "words");
    # a 500 (retried by the pool) and a malformed reply (re-asked) on the way change nothing
    with JudgeServer(script=["500", "malformed"]) as srv:
        judge = build_pairwise_judge({"type": "http", "model": "m", "endpoints": [srv.url], "retries": 3,
                                      "backoff_base_s": 0.01, "timeout_s": 5})
        sc = PairwiseScorer(judge, PairwiseConfig(enabled=True), 3)
        try:
            for k, t in enumerate(["cat e words", "cat e", "cat"]):
                sc.submit(0, f"0:{k}", RUB, t)
            got = sc.collect(0)
            m = sc.metrics()
        finally:
            sc.close()
    assert got[0].reward > got[1].reward > got[2].reward
    assert m["pairwise/kept"] == 3 and m["pairwise/judge_calls"] == 6 and m["pairwise/judge_failures"] == 0
    assert srv.counts["500"] == 1 and srv.counts["malformed"] == 1
    assert "<hard_rules>" in srv.bodies[-1]["messages"][1]["content"]
