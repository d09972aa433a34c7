"""Pairwise rubric rewards for the train loop: the same submit / collect / metrics / close face as the
pointwise scorer (rubric_fast.trainer.rewards), but a group is judged by comparing its members.

When the last of a group's G responses is submitted, the group's comparison plan (rubric_fast.rubric.pairwise)
runs on a background event loop: every planned pair is asked in both orders, concurrently; only
order-consistent outcomes are kept (a failed call or an inconsistent pair is missing data, never a loss);
Bradley-Terry utilities become rewards (expected win rate against the rest of the group). A member without a
kept comparison has reward None and is excluded from its group's baseline like any failed judgement.

Junk responses (rubric_fast.judges.guard) are not shown to the judge: junk loses to a real response and ties
with junk. With the rule judge each response's pointwise rule verdicts are attached too, so the per-criterion
pass rates in the metrics stay comparable with a pointwise run.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from rubric_fast.judges.guard import GuardConfig, junk_reason
from rubric_fast.judges.pairwise import RulePairwiseJudge
from rubric_fast.scoring.config import build_pairwise_judge, effective_guard
from rubric_fast.rubric.pairwise import PLANS, comparison_plan, consistent_outcome, pairwise_rewards

from .rewards import ScoredCompletion

from rubric_fast.settings import check_fields, setting


@dataclass
class PairwiseConfig:
    """Pairwise judging (OpenRubrics / Rubric-RM): the judge compares two responses against the rubric."""

    enabled: bool = setting(False, "judge the responses of a group against each other; Bradley-Terry utilities are the rewards")
    plan: str = setting("all_pairs", "which pairs are compared", choices=PLANS)
    comparisons_per_response: int = setting(2, "round_robin: k comparisons per response (k >= G-1: all pairs)",
                                            check=lambda v: v >= 1, accepts=">= 1")
    prior: float = setting(0.1, "Bradley-Terry Gaussian prior precision (> 0: finite utilities)",
                           check=lambda v: v > 0, accepts="a number > 0 (keeps the utilities finite)")
    deadline_s: float = setting(600.0, "per group, from its last submission: unanswered comparisons fail",
                                check=lambda v: v > 0, accepts="seconds > 0")


def check_config(p: PairwiseConfig, group_size: int, key: str = "reward.pairwise") -> None:
    check_fields(p, key + ".")
    if p.enabled and group_size < 2:
        raise ValueError(f"{key}.enabled: pairwise judging compares the members of a group; "
                         f"rollout.num_generations is {group_size}, it needs >= 2")
    if p.enabled and p.plan == "round_robin" and p.comparisons_per_response > group_size - 1:
        raise ValueError(f"{key}.comparisons_per_response: got {p.comparisons_per_response}, but a group of "
                         f"rollout.num_generations={group_size} has only {group_size - 1} other members "
                         "(use plan: all_pairs)")


class PairwiseScorer:
    def __init__(self, judge, cfg: PairwiseConfig, group_size: int, *, guard: Any = True):
        self.judge, self.cfg, self.group_size = judge, cfg, group_size
        self.guard = GuardConfig.from_value(guard)
        self.cache_path: str | None = None  # pairwise verdicts are not cached
        self.c: Counter = Counter()
        self._members: dict[Any, list[tuple[str, Any, str]]] = {}
        self._futures: dict[Any, Any] = {}
        self._latencies: list[float] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rubric-fast-pairwise", daemon=True)
        self._thread.start()

    def submit(self, group_id, rollout_id: str, rubric, response: str) -> None:
        members = self._members.setdefault(group_id, [])
        members.append((rollout_id, rubric, response))
        if len(members) == self.group_size:
            self._futures[group_id] = asyncio.run_coroutine_threadsafe(
                self._score_group(group_id, self._members.pop(group_id)), self._loop)

    def collect(self, group_id) -> list[ScoredCompletion]:
        return self._futures.pop(group_id).result()

    async def _compare(self, rubric, i: int, j: int, texts: list[str], junk: list[str | None],
                       deadline: float) -> float | None:
        if junk[i] or junk[j]:  # decided without the judge
            self.c["guarded"] += 1
            return 0.5 if junk[i] and junk[j] else (0.0 if junk[i] else 1.0)
        ab, ba = await asyncio.gather(self.judge.compare(rubric, texts[i], texts[j], deadline),
                                      self.judge.compare(rubric, texts[j], texts[i], deadline))
        self.c["judge_calls"] += 2
        self.c["judge_failures"] += (ab.winner is None) + (ba.winner is None)
        s = consistent_outcome(ab.winner, ba.winner)
        if ab.winner is None or ba.winner is None:
            self.c["failed"] += 1
        elif s is None:
            self.c["inconsistent"] += 1
        else:
            self.c["kept"] += 1
            self.c["ties"] += s == 0.5
        return s

    async def _score_group(self, group_id, members: list[tuple[str, Any, str]]) -> list[ScoredCompletion]:
        t0 = time.monotonic()
        rubric = members[0][1]
        texts = [m[2] for m in members]
        junk = [junk_reason(t, rubric.criteria, self.guard, prompt=rubric.prompt) for t in texts]
        seed = group_id if isinstance(group_id, int) else hash(group_id) & 0xFFFF
        pairs = comparison_plan(len(members), self.cfg.plan, self.cfg.comparisons_per_response, seed=seed)
        self.c["comparisons"] += len(pairs)
        deadline = t0 + self.cfg.deadline_s
        try:
            scores = await asyncio.gather(*(self._compare(rubric, i, j, texts, junk, deadline) for i, j in pairs))
        except Exception as exc:  # noqa: BLE001 - a crashing judge fails this group's comparisons, not the run
            self.c["failed"] += len(pairs)
            scores = [None] * len(pairs)
            crash = f"judge_crashed: {type(exc).__name__}: {exc}"
        else:
            crash = None
        rewards, theta = pairwise_rewards(len(members), dict(zip(pairs, scores)), prior=self.cfg.prior)
        latency = time.monotonic() - t0
        self._latencies.append(latency)
        out = []
        for k, (rid, _, text) in enumerate(members):
            verdicts = self.judge.grade(rubric, text) if isinstance(self.judge, RulePairwiseJudge) else []
            err = None
            if rewards[k] is None:
                err = crash or ("pairwise: every comparison of this response failed or was order-inconsistent "
                                "(missing data, not a loss)")
                self.c["rollouts_failed"] += 1
            out.append(ScoredCompletion(group_id, rid, rewards[k], verdicts, err, latency, junk[k]))
        return out

    def metrics(self) -> dict[str, float]:
        c = self.c
        m = {f"pairwise/{k}": float(c[k]) for k in ("comparisons", "kept", "failed", "inconsistent", "ties",
                                                     "guarded", "judge_calls", "judge_failures", "rollouts_failed")}
        judged = c["kept"] + c["inconsistent"]
        if judged:
            m["pairwise/consistency_rate"] = c["kept"] / judged
        if self._latencies:
            lat = sorted(self._latencies)
            m["judge/latency_p50"] = lat[len(lat) // 2]
        return m

    def close(self) -> None:
        if not self._loop.is_running():
            return
        close = getattr(self.judge, "aclose", None)
        if close is not None:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def make_pairwise_scorer(judge_cfg: Any, scoring_cfg: Any, cfg: PairwiseConfig,
                         group_size: int, *, judge=None) -> PairwiseScorer:
    """From the trainer's ``judge`` / ``scoring`` sections (the scoring ``guard`` key applies here too)."""
    judge = judge if judge is not None else build_pairwise_judge(judge_cfg)
    scoring_guard = scoring_cfg.get("guard") if isinstance(scoring_cfg, dict) else getattr(scoring_cfg, "guard", None)
    guard = effective_guard(scoring_guard, judge_cfg)
    return PairwiseScorer(judge, cfg, group_size, guard=guard)
