"""The async streaming scorer: one task per submitted completion; groups released when complete."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from rubric_fast.judges.base import JudgeRequest, Verdict, failed
from rubric_fast.judges.guard import GuardConfig, guard_verdicts, junk_reason
from rubric_fast.rubric.aggregate import aggregate
from rubric_fast.rubric.loaders import rubric_from_dict
from rubric_fast.rubric.schema import Aggregation, Rubric
from rubric_fast.settings import check_fields, setting

from .audit import JudgeAudit
from .cache import VerdictCache, cache_key


class ScoringError(RuntimeError):
    """The scorer stopped: the judge error rate passed ``max_error_rate`` (or the scorer was closed)."""


_RATE = dict(check=lambda v: 0.0 <= v <= 1.0, accepts="a number in [0, 1]")


@dataclass
class ScorerConfig:
    """``scoring``: everything but the judge (the keys :func:`build_scorer` accepts)."""

    group_size: int | None = setting(None, "members per group; null = pass group_size= or close_group()",
                                     check=lambda v: v >= 1, accepts="an integer >= 1 or null")
    min_valid: int = setting(2, "groups with fewer scored members are dropped (and counted)",
                             check=lambda v: v >= 0, accepts="an integer >= 0")
    deadline_s: float = setting(600.0, "seconds per response from its submission; then its unjudged criteria "
                                "fail (never a 0)", check=lambda v: v > 0, accepts="a number of seconds > 0")
    max_error_rate: float = setting(0.5, "fraction of failed responses (over the last error_window) that stops "
                                    "the run", **_RATE)
    error_window: int = setting(200, "responses the error rate is measured over", check=lambda v: v >= 1,
                                accepts="an integer >= 1")
    error_min_samples: int = setting(50, "no stop before this many responses have finished",
                                     check=lambda v: v >= 0, accepts="an integer >= 0")
    guard: Any = setting(True, "the junk guard: true, false, or a mapping of GuardConfig keys "
                         "(rubric_fast.judges.guard)")
    cache_path: str | None = setting(None, "SQLite verdict cache; null = none")
    aggregation: dict | None = setting(None, "an aggregation block that overrides every rubric's (e.g. {method: "
                                       "weighted_mean})")
    deliver_dropped: bool = setting(False, "also hand out dropped groups (with dropped=True)")
    audit_rate: float = setting(0.02, "canary requests per scored response (rubric_fast.scoring.audit); 0 = off",
                                **_RATE)
    audit_max_false_pass: float = setting(0.25, "an endpoint that passes a larger share of content-free canaries "
                                          "is drained, or stops the run", **_RATE)
    audit_min_samples: int = setting(20, "canary verdicts per endpoint before it can be judged",
                                     check=lambda v: v >= 1, accepts="an integer >= 1")
    audit_seed: int = setting(0, "seed of the canary choice")

    def validate(self) -> None:
        """ValueError naming ``scoring.<key>`` (the declared checks, the guard and the aggregation block)."""
        check_fields(self, "scoring.")
        GuardConfig.from_value(self.guard)
        if self.aggregation is not None:
            Aggregation.from_dict(self.aggregation, key="scoring.aggregation")


@dataclass
class ScoredRollout:
    rollout_id: str
    reward: float | None                 # None = failed (excluded from its group), never 0 for a failure
    verdicts: list[Verdict]
    detail: dict[str, Any]
    error: str | None = None
    guarded: bool = False
    latency_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    guard_reason: str | None = None      # why the guard judged it (a key of rubric_fast.judges.guard.REASONS)


@dataclass
class ScoredGroup:
    group_id: Any
    members: list[ScoredRollout]
    dropped: bool = False

    @property
    def rewards(self) -> list[float | None]:
        return [m.reward for m in self.members]

    @property
    def valid(self) -> list[ScoredRollout]:
        return [m for m in self.members if m.reward is not None]


@dataclass
class _Group:
    expected: int | None
    members: dict[str, ScoredRollout | None] = field(default_factory=dict)
    closed: bool = False


def summarize_errors(errors, *, limit: int = 5, width: int = 300) -> str:
    """Each distinct error once, most frequent first, with its count: ``3 x transport: ConnectError ...``."""
    counts = Counter(e for e in errors if e)
    if not counts:
        return "no error message"
    shown = [f"{n} x {e[:width]}{'...' if len(e) > width else ''}" if n > 1 else e[:width]
             for e, n in counts.most_common(limit)]
    more = len(counts) - limit
    return "; ".join(shown) + (f"; and {more} other distinct errors" if more > 0 else "")


def rollout_errors(r) -> list[str]:
    """The judge errors behind a failed rollout (one per distinct verdict error), else its own error."""
    errs = sorted({v.error for v in getattr(r, "verdicts", []) or [] if v.error})
    return errs or ([r.error] if getattr(r, "error", None) else [])


def _percentile(xs, p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def iter_judges(judge) -> list:
    """The judge and every judge it wraps (guard, routing, counting)."""
    out, todo = [], [judge]
    while todo:
        j = todo.pop()
        out.append(j)
        if hasattr(j, "inner"):
            todo.append(j.inner)
        if isinstance(getattr(j, "judges", None), dict):
            todo.extend(j.judges.values())
    return out


class StreamingScorer:
    """Async API. Call :meth:`submit` from the event loop; read groups with ``async for g in scorer.groups()``
    or pass ``on_group`` (called in the loop thread for every released group)."""

    def __init__(self, judge, config: ScorerConfig | None = None, *, cache: VerdictCache | None = None,
                 on_group: Callable[[ScoredGroup], None] | None = None):
        self.judge = judge
        self.config = config or ScorerConfig()
        self.config.validate()
        self.guard = GuardConfig.from_value(self.config.guard)
        self.aggregation = (Aggregation.from_dict(self.config.aggregation, key="scoring.aggregation")
                            if self.config.aggregation else None)
        if cache is None and self.config.cache_path:
            cache = VerdictCache(self.config.cache_path)
        self.cache = cache
        self.on_group = on_group
        self._groups: dict[Any, _Group] = {}
        self._ready: asyncio.Queue | None = None
        self._tasks: set[asyncio.Task] = set()
        self._fatal: ScoringError | None = None
        self.audit = JudgeAudit(judge, rate=self.config.audit_rate, max_false_pass=self.config.audit_max_false_pass,
                                min_samples=self.config.audit_min_samples, seed=self.config.audit_seed,
                                deadline_s=self.config.deadline_s, judges=iter_judges(judge))
        self._identity = getattr(judge, "identity", getattr(judge, "name", type(judge).__name__))
        self._holistic = bool(getattr(judge, "holistic", False))
        # metrics
        self.c: Counter = Counter()
        self._window: deque = deque(maxlen=self.config.error_window)
        self._latencies: deque = deque(maxlen=20000)
        self._last_errors: deque = deque(maxlen=200)

    @property
    def fatal(self) -> ScoringError | None:
        """Why the scorer stopped: the judge error rate, or the judge audit (None while running)."""
        return self._fatal or self.audit.fatal

    @fatal.setter
    def fatal(self, value: ScoringError | None) -> None:
        self._fatal = value

    # ------------------------------------------------------------------------------------------ one rollout
    async def score(self, rollout_id: str, rubric: Rubric | dict, response: str, *,
                    submitted_at: float | None = None, **meta) -> ScoredRollout:
        """Score one completion now (no grouping)."""
        if isinstance(rubric, dict):
            rubric = rubric_from_dict(rubric)
        t0 = submitted_at or time.monotonic()
        deadline = t0 + self.config.deadline_s
        criteria = rubric.criteria
        reason = junk_reason(response, criteria, self.guard, prompt=rubric.prompt)
        verdicts: list[Verdict] = []
        if reason is not None:
            verdicts = guard_verdicts(criteria, reason, holistic=self._holistic)
            self.c["guarded"] += 1
            self.c[f"guarded_{reason}"] += 1
        else:
            if self._holistic:
                units = [(cache_key(self._identity, criteria, rubric.prompt, response, rubric.reference_answer), criteria)]
            else:
                units = [(cache_key(self._identity, c, rubric.prompt, response, rubric.reference_answer), [c])
                         for c in criteria]
            todo_units = []
            for key, crit in units:
                hit = self.cache.get(key) if self.cache is not None else None
                if hit is not None:
                    verdicts += hit
                    self.c["cache_hits"] += len(crit)
                else:
                    todo_units.append((key, crit))
            todo = [c for _, crit in todo_units for c in crit]
            if todo:
                verdicts += await self._ask_judge(rollout_id, rubric, response, todo, deadline, meta)
                if self.cache is not None:
                    by_id = {v.criterion_id: v for v in verdicts}
                    for key, crit in todo_units:
                        if self._holistic:
                            self.cache.put(key, [v for v in verdicts if not v.cached], judge=self._identity)
                        elif crit[0].id in by_id:
                            self.cache.put(key, [by_id[crit[0].id]], judge=self._identity)
        res = aggregate(rubric, verdicts, self.aggregation)
        reward, error = res.reward, res.error
        if error is not None:
            first = next((f"{v.criterion_id}: {v.error}" for v in verdicts if v.error), None)
            if first:
                error = f"{error}; first judge error: {first}"
        guarded = reason is not None
        if guarded and reward is not None:
            reward = min(reward, 0.0)  # junk never scores above 0, whatever the aggregation
        for v in verdicts:
            if v.error:
                kind = v.error.split(":", 1)[0]
                self.c[f"verdict_error_{kind}"] += 1
        out = ScoredRollout(rollout_id, reward, verdicts, res.detail, error, guarded, time.monotonic() - t0, meta,
                            guard_reason=reason)
        self._account(out)
        self.audit.maybe_send(rubric)  # a canary for the same rubric now and then; never part of a reward
        return out

    async def _ask_judge(self, rollout_id, rubric, response, todo, deadline, meta) -> list[Verdict]:
        req = JudgeRequest(rollout_id, rubric.prompt, response, todo, rubric.reference_answer, deadline, meta)
        self.c["judge_requests"] += 1
        self.c["verdicts_requested"] += len(todo)
        try:
            # the judge sees the deadline itself; the extra second only catches a judge that ignores it
            got = await asyncio.wait_for(self.judge.grade(req), max(0.0, deadline - time.monotonic()) + 1.0)
        except asyncio.TimeoutError:
            return failed(todo, f"deadline: rollout deadline of {self.config.deadline_s:g}s passed")
        except Exception as exc:  # noqa: BLE001 - a crashing judge fails this rollout, not the run
            return failed(todo, f"judge_crashed: {type(exc).__name__}: {exc}")
        if self._holistic:
            return list(got)
        by_id = {v.criterion_id: v for v in got}
        return [by_id.get(c.id) or Verdict(c.id, None, "", "missing: the judge returned no verdict") for c in todo]

    def _account(self, r: ScoredRollout) -> None:
        self.c["rollouts_done"] += 1
        self._latencies.append(r.latency_s)
        failed_ = r.reward is None
        self._window.append(failed_)
        if failed_:
            self.c["rollouts_failed"] += 1
            if any(v.error and v.error.startswith(("deadline", "timeout")) for v in r.verdicts):
                self.c["rollouts_timed_out"] += 1
            self._last_errors.extend(rollout_errors(r) or ["unknown"])
        else:
            self.c["rollouts_scored"] += 1
        if (self.fatal is None and self.c["rollouts_done"] >= self.config.error_min_samples
                and len(self._window) > 0):
            rate = sum(self._window) / len(self._window)
            if rate > self.config.max_error_rate:
                self.fatal = ScoringError(
                    f"judge error rate {rate:.1%} over the last {len(self._window)} rollouts exceeds "
                    f"scoring.max_error_rate={self.config.max_error_rate:g}; errors: "
                    f"{summarize_errors(self._last_errors)}. Check the judge endpoint, or raise max_error_rate.")

    # ------------------------------------------------------------------------------------------ streaming
    def submit(self, group_id, rollout_id: str, rubric: Rubric | dict, response: str, *,
               group_size: int | None = None, **meta) -> asyncio.Task:
        """Start scoring at once (call from the event loop). Raises ScoringError once the run has stopped."""
        if self.fatal is not None:
            raise self.fatal
        g = self._groups.get(group_id)
        if g is None:
            g = self._groups[group_id] = _Group(group_size or self.config.group_size)
        elif group_size is not None:
            g.expected = group_size
        if g.closed:
            raise ValueError(f"group {group_id!r} was already closed or released")
        if rollout_id in g.members:
            raise ValueError(f"rollout {rollout_id!r} was already submitted to group {group_id!r}")
        g.members[rollout_id] = None
        self.c["rollouts_submitted"] += 1
        task = asyncio.get_running_loop().create_task(self._run(group_id, rollout_id, rubric, response, meta))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, group_id, rollout_id, rubric, response, meta) -> None:
        t0 = time.monotonic()
        try:
            r = await self.score(rollout_id, rubric, response, submitted_at=t0, **meta)
        except Exception as exc:  # noqa: BLE001 - e.g. a malformed rubric dict: this member fails
            r = ScoredRollout(rollout_id, None, [], {}, f"{type(exc).__name__}: {exc}", meta=meta)
            self._account(r)
        g = self._groups.get(group_id)
        if g is None:
            return
        g.members[rollout_id] = r
        self._maybe_release(group_id)

    def close_group(self, group_id) -> None:
        """No more members will come for this group: release it once its submitted members are done."""
        g = self._groups.get(group_id)
        if g is None:
            raise KeyError(f"unknown group {group_id!r}")
        g.closed = True
        self._maybe_release(group_id)

    def _maybe_release(self, group_id) -> None:
        g = self._groups[group_id]
        if any(m is None for m in g.members.values()):
            return
        if not g.closed and (g.expected is None or len(g.members) < g.expected):
            return
        del self._groups[group_id]
        members = list(g.members.values())
        valid = sum(m.reward is not None for m in members)
        dropped = valid < self.config.min_valid
        self.c["groups_dropped" if dropped else "groups_released"] += 1
        if dropped and not self.config.deliver_dropped:
            return
        group = ScoredGroup(group_id, members, dropped)
        if self.on_group is not None:
            self.on_group(group)
        else:
            if self._ready is None:
                self._ready = asyncio.Queue()
            self._ready.put_nowait(group)

    async def next_group(self, timeout: float | None = None) -> ScoredGroup | None:
        """The next released group, or None after ``timeout`` seconds. Raises ScoringError after a stop."""
        if self._ready is None:
            self._ready = asyncio.Queue()
        if self.fatal is not None and self._ready.empty():
            raise self.fatal
        try:
            return await asyncio.wait_for(self._ready.get(), timeout)
        except asyncio.TimeoutError:
            if self.fatal is not None:
                raise self.fatal from None
            return None

    async def groups(self):
        """Async iterator over released groups until every submitted rollout is done and no group is open."""
        while True:
            if self._ready is not None and not self._ready.empty():
                yield self._ready.get_nowait()
                continue
            if self.fatal is not None:
                raise self.fatal
            if not self._tasks and not self._groups:
                return
            g = await self.next_group(timeout=0.05)
            if g is not None:
                yield g

    async def drain(self) -> None:
        """Wait until every submitted rollout is scored or failed."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    @property
    def pending_groups(self) -> int:
        return len(self._groups)

    async def aclose(self) -> None:
        await self.audit.aclose()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for j in iter_judges(self.judge):
            if hasattr(j, "aclose"):
                await j.aclose()
        if self.cache is not None:
            self.cache.close()

    # ------------------------------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, Any]:
        c = self.c
        done = c["rollouts_done"]
        requested = c["verdicts_requested"]
        lat = list(self._latencies)
        m: dict[str, Any] = {
            "rollouts_submitted": c["rollouts_submitted"], "rollouts_done": done,
            "rollouts_scored": c["rollouts_scored"], "rollouts_failed": c["rollouts_failed"],
            "in_flight": len(self._tasks), "groups_released": c["groups_released"],
            "groups_dropped": c["groups_dropped"], "groups_open": len(self._groups),
            "error_rate": c["rollouts_failed"] / done if done else 0.0,
            "timeout_rate": c["rollouts_timed_out"] / done if done else 0.0,
            "guarded": c["guarded"],
            "guarded_by_reason": {k[len("guarded_"):]: v for k, v in c.items() if k.startswith("guarded_")},
            "judge_requests": c["judge_requests"], "verdicts_requested": requested,
            "cache_hits": c["cache_hits"],
            "cache_hit_rate": c["cache_hits"] / (c["cache_hits"] + requested) if c["cache_hits"] + requested else 0.0,
            "latency_p50_s": _percentile(lat, 0.5), "latency_p95_s": _percentile(lat, 0.95),
            "verdict_errors": {k[len("verdict_error_"):]: v for k, v in c.items() if k.startswith("verdict_error_")},
        }
        parse_failures = 0
        for j in iter_judges(self.judge):
            pool = getattr(j, "pool", None)
            if pool is not None:
                for k, v in pool.metrics.as_dict().items():
                    if isinstance(v, (int, float)) and not k.startswith("call_latency"):
                        m[k] = m.get(k, 0) + v
                    elif k.startswith("call_latency") and v is not None:
                        m[k] = max(m.get(k) or 0.0, v)
                    elif isinstance(v, dict):
                        m.setdefault(k, Counter()).update(v)
            stats = getattr(j, "stats", None)
            if isinstance(stats, Counter):
                parse_failures += stats["parse_failures"]
                m["judge_reasks"] = m.get("judge_reasks", 0) + stats["reasks"]
        if "call_errors" in m:
            m["call_errors"] = dict(m["call_errors"])
        m["parse_failures"] = parse_failures
        m["parse_failure_rate"] = parse_failures / requested if requested else 0.0
        m["tokens"] = m.get("prompt_tokens", 0) + m.get("completion_tokens", 0)
        m.update(self.audit.metrics())
        return m


async def score_all(scorer: StreamingScorer, items: list[tuple[str, Any, str]]) -> list[ScoredRollout]:
    """Score every (rollout_id, rubric or record, response) concurrently, outside any group; a crash fails
    that item (reward None, the error kept), never the batch, never a 0."""

    async def one(rid, rubric, response):
        try:
            return await scorer.score(rid, rubric, response)
        except Exception as exc:  # noqa: BLE001 - one broken item fails itself
            return ScoredRollout(rid, None, [], {}, f"{type(exc).__name__}: {exc}")

    return list(await asyncio.gather(*(one(*it) for it in items)))
