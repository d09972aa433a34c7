"""Streaming reward scoring as the train loop sees it: submit each completion, collect finished groups.

:class:`StreamingScorer` runs judge calls on a background asyncio loop (one thread), so the loop can keep
generating while earlier completions are graded. A group is complete when every member has a reward or
has failed (reward None: never turned into 0; the advantage op excludes it).

``make_scorer`` builds ``rubric_fast.scoring.ScoringService`` from the ``judge`` / ``scoring`` config
sections (passed through unchanged, see rubric_fast/scoring/__init__.py for their keys) and adapts it to
this interface (:class:`ServiceScorer`); :class:`StreamingScorer` is a minimal local fallback used only
when the scoring package cannot be imported.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from rubric_fast.judges.base import JudgeRequest, Verdict
from rubric_fast.rubric import Rubric, aggregate


@dataclass
class ScoredCompletion:
    group_id: int
    rollout_id: str
    reward: float | None
    verdicts: list[Verdict] = field(default_factory=list)
    error: str | None = None
    latency_s: float = 0.0


def make_judge(judge_cfg: dict[str, Any]):
    kind = (judge_cfg or {}).get("type", (judge_cfg or {}).get("kind", "rule"))
    if kind == "rule":
        from rubric_fast.judges.rule import RuleJudge

        return RuleJudge()
    raise ValueError(f"judge.kind: got {kind!r}; the trainer's scorer currently builds: rule "
                     "(other judges come with rubric_fast.scoring's factories)")


class StreamingScorer:
    """Grades completions concurrently on a private event loop; thread-safe submit / collect."""

    def __init__(self, judge, *, timeout_s: float = 600.0, max_concurrency: int = 64):
        self.judge = judge
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rubric-fast-scorer", daemon=True)
        self._thread.start()
        self._sem: asyncio.Semaphore | None = None
        self._max_concurrency = max_concurrency
        self._pending: dict[int, list[Future]] = {}
        self._latencies: list[float] = []
        self._n_done = 0
        self._n_failed = 0
        self._lock = threading.Lock()

    async def _grade(self, group_id: int, rollout_id: str, rubric: Rubric, response: str) -> ScoredCompletion:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._max_concurrency)
        t0 = time.monotonic()
        async with self._sem:
            req = JudgeRequest(rollout_id=rollout_id, prompt=rubric.prompt, response=response,
                               criteria=rubric.criteria, reference_answer=rubric.reference_answer,
                               deadline_s=t0 + self.timeout_s)
            try:
                verdicts = await self.judge.grade(req)
                result = aggregate(rubric, verdicts)
                reward, error = result.reward, result.error
            except Exception as exc:  # a judge bug must not kill training: the sample is excluded
                verdicts, reward, error = [], None, f"{type(exc).__name__}: {exc}"
        lat = time.monotonic() - t0
        with self._lock:
            self._latencies.append(lat)
            self._n_done += 1
            self._n_failed += reward is None
        return ScoredCompletion(group_id, rollout_id, reward, verdicts, error, lat)

    def submit(self, group_id: int, rollout_id: str, rubric: Rubric, response: str) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._grade(group_id, rollout_id, rubric, response), self._loop)
        self._pending.setdefault(group_id, []).append(fut)

    def collect(self, group_id: int) -> list[ScoredCompletion]:
        """Block until every submitted member of ``group_id`` is scored; results in submit order."""
        futs = self._pending.pop(group_id)
        return [f.result(timeout=self.timeout_s) for f in futs]

    def metrics(self) -> dict[str, float]:
        """Judge latency percentiles and error rate since the last call."""
        with self._lock:
            lats, done, failed = self._latencies, self._n_done, self._n_failed
            self._latencies, self._n_done, self._n_failed = [], 0, 0
        if not done:
            return {}
        q = statistics.quantiles(lats, n=20) if len(lats) > 1 else [lats[0]] * 19
        return {"judge/latency_p50": statistics.median(lats), "judge/latency_p95": q[18],
                "judge/error_rate": failed / done, "judge/errors": float(failed)}

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


class ServiceScorer:
    """The trainer's submit / collect / metrics interface over ``rubric_fast.scoring.ScoringService``."""

    def __init__(self, service, group_size: int):
        self.service = service
        self.group_size = group_size
        self._ready: dict[Any, Any] = {}
        self._order: dict[Any, list[str]] = {}

    def submit(self, group_id: int, rollout_id: str, rubric: Rubric, response: str) -> None:
        self._order.setdefault(group_id, []).append(rollout_id)
        self.service.submit(group_id, rollout_id, rubric, response, group_size=self.group_size)

    def collect(self, group_id: int) -> list[ScoredCompletion]:
        while group_id not in self._ready:
            for g in self.service.ready_groups(timeout=None):
                self._ready[g.group_id] = g
        group = self._ready.pop(group_id)
        by_id = {m.rollout_id: m for m in group.members}
        out = []
        for rid in self._order.pop(group_id):
            m = by_id.get(rid)
            if m is None or group.dropped:  # too few valid members: the group carries no baseline
                out.append(ScoredCompletion(group_id, rid, None, [] if m is None else m.verdicts,
                                            "group dropped by the scorer (too few valid members)"))
            else:
                out.append(ScoredCompletion(group_id, rid, m.reward, m.verdicts, m.error, m.latency_s))
        return out

    def metrics(self) -> dict[str, float]:
        m = self.service.metrics()
        out = {}
        for src, dst in (("latency_p50_s", "judge/latency_p50"), ("latency_p95_s", "judge/latency_p95"),
                         ("error_rate", "judge/error_rate"), ("rollouts_failed", "judge/errors"),
                         ("groups_dropped", "judge/groups_dropped"), ("cache_hit_rate", "judge/cache_hit_rate"),
                         ("judge_requests", "judge/requests"), ("tokens", "judge/tokens")):
            v = m.get(src)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[dst] = float(v)
        return out

    def close(self) -> None:
        self.service.close()


def make_scorer(judge_cfg: dict[str, Any], scoring_cfg: dict[str, Any], group_size: int):
    """ScoringService from the config sections; the local rule-judge scorer if the package is missing."""
    try:
        from rubric_fast.scoring import build_service
    except ImportError:  # pragma: no cover - the scoring package ships with rubric_fast
        return _local_scorer(judge_cfg, scoring_cfg)
    judge = dict(judge_cfg or {})
    if "kind" in judge and "type" not in judge:  # accept the older spelling
        judge["type"] = judge.pop("kind")
    # every group comes back, even one with too few valid members (its rewards are then excluded)
    config = {"deliver_dropped": True, **(scoring_cfg or {}), "judge": judge, "group_size": group_size}
    return ServiceScorer(build_service(config), group_size)


def _local_scorer(judge_cfg: dict[str, Any], scoring_cfg: dict[str, Any]) -> StreamingScorer:
    return StreamingScorer(make_judge(judge_cfg), timeout_s=float((scoring_cfg or {}).get("timeout_s", 600.0)),
                           max_concurrency=int((scoring_cfg or {}).get("max_concurrency", 64)))
