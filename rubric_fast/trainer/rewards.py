"""Streaming reward scoring as the train loop sees it: submit each completion, collect finished groups.

:class:`StreamingScorer` runs judge calls on a background asyncio loop (one thread), so the loop can keep
generating while earlier completions are graded. A group is complete when every member has a reward or
has failed (reward None: never turned into 0; the advantage op excludes it).

TODO(judges): when ``rubric_fast.scoring.ScoringService`` lands, ``make_scorer`` should build it from the
``judge`` / ``scoring`` config sections and wrap it in this interface; until then the rule judge is
driven here directly.
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
    kind = (judge_cfg or {}).get("kind", "rule")
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


def make_scorer(judge_cfg: dict[str, Any], scoring_cfg: dict[str, Any]) -> StreamingScorer:
    return StreamingScorer(make_judge(judge_cfg), timeout_s=float((scoring_cfg or {}).get("timeout_s", 600.0)),
                           max_concurrency=int((scoring_cfg or {}).get("max_concurrency", 64)))
