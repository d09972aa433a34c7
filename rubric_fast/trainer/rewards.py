"""Streaming reward scoring as the train loop sees it: submit each completion, collect finished groups.

``make_scorer`` builds ``rubric_fast.scoring.ScoringService`` (judge calls on a background event loop, so
generation continues while earlier completions are graded) from the ``judge`` / ``scoring`` config
sections (their keys: rubric_fast/scoring/__init__.py), and adapts it to the loop's submit / collect /
metrics (:class:`ServiceScorer`). Two things are set per rank:

* budgets: ``judge.concurrency``, ``judge.rpm`` and ``judge.tpm`` are for the whole job; with W ranks each
  rank's pool gets 1/W of each (concurrency rounded down, at least 1), so all ranks together stay within
  the limits of the judge endpoints;
* the verdict cache: ``scoring.cache_path`` defaults to ``<run_dir>/judge_cache/rank_{rank}.sqlite`` (one
  SQLite file per rank: no writer contention, and safe on a shared file system); a configured path may
  contain ``{rank}``; ``cache_path: null`` turns the cache off. A resumed run regenerates the same
  completions on the same rank, so verdicts already paid for are served from the cache. A group is complete when every member has a
reward or has failed (reward None: never turned into 0; the advantage op excludes it).
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rubric_fast.judges.base import Verdict
from rubric_fast.rubric import Rubric


@dataclass
class ScoredCompletion:
    group_id: int
    rollout_id: str
    reward: float | None
    verdicts: list[Verdict] = field(default_factory=list)
    error: str | None = None
    latency_s: float = 0.0
    guard_reason: str | None = None      # set when the guard judged it (rubric_fast.judges.guard.REASONS)


class ServiceScorer:
    """The trainer's submit / collect / metrics interface over ``rubric_fast.scoring.ScoringService``."""

    def __init__(self, service, group_size: int):
        self.service = service
        self.group_size = group_size
        self.cache_path: str | None = None  # where this rank's verdicts are cached (recorded in checkpoints)
        self._ready: dict[Any, Any] = {}
        self._order: dict[Any, list[str]] = {}

    def submit(self, group_id: int, rollout_id: str, rubric: Rubric, response: str, *,
               group_size: int | None = None) -> None:
        """``group_size``: members of this group when it is not the configured G (multi-turn rollouts judged
        per turn submit every assistant turn of the group's conversations)."""
        self._order.setdefault(group_id, []).append(rollout_id)
        self.service.submit(group_id, rollout_id, rubric, response, group_size=group_size or self.group_size)

    def score_now(self, items: list[tuple[str, Rubric, str]]) -> list[ScoredCompletion]:
        """Score ``(rollout_id, rubric, response)`` outside any group, waiting (refined samples, RGR)."""
        return [ScoredCompletion(None, r.rollout_id, r.reward, r.verdicts, r.error, r.latency_s, r.guard_reason)
                for r in self.service.score_now(items)]

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
                out.append(ScoredCompletion(group_id, rid, m.reward, m.verdicts, m.error, m.latency_s,
                                            m.guard_reason))
        return out

    def metrics(self) -> dict[str, float]:
        m = self.service.metrics()
        out = {}
        for src, dst in (("latency_p50_s", "judge/latency_p50"), ("latency_p95_s", "judge/latency_p95"),
                         ("error_rate", "judge/error_rate"), ("rollouts_failed", "judge/errors"),
                         ("groups_dropped", "judge/groups_dropped"), ("cache_hit_rate", "judge/cache_hit_rate"),
                         ("judge_requests", "judge/requests"), ("tokens", "judge/tokens"),
                         ("verdicts_requested", "judge/verdicts_requested"), ("cache_hits", "judge/cache_hits")):
            v = m.get(src)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[dst] = float(v)
        # the judge audit (canaries): how often each endpoint passes junk / fails a reference answer
        for key in ("false_pass_rate", "false_fail_rate"):
            if m.get(f"audit_{key}") is not None:
                out[f"judge/audit/{key}"] = float(m[f"audit_{key}"])
        for label, st in (m.get("audit") or {}).items():
            for key in ("false_pass_rate", "false_fail_rate", "drained"):
                if st.get(key) is not None:
                    out[f"judge/audit/{label}/{key}"] = float(st[key])
        return out

    def close(self) -> None:
        self.service.close()


BUDGET_KEYS = ("concurrency", "rpm", "tpm")


def _mapping(cfg: Any) -> dict[str, Any]:
    """A config section as a plain mapping (a dataclass such as ScorerConfig, a mapping, or None)."""
    if cfg is None:
        return {}
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def rank_share(judge_cfg: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The judge config with this rank's share (1/world_size) of the job's concurrency / rpm / tpm."""
    judge = dict(judge_cfg)
    if world_size > 1:
        for key in BUDGET_KEYS:
            v = judge.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                judge[key] = max(1, int(v) // world_size) if key == "concurrency" else v / world_size
    return judge


def make_scorer(judge_cfg: Any, scoring_cfg: Any, group_size: int, *,
                run_dir: str | Path | None = None, rank: int = 0, world_size: int = 1) -> ServiceScorer:
    """ScoringService from the ``judge`` / ``scoring`` config sections, with this rank's budget and cache."""
    from rubric_fast.scoring import build_service
    from rubric_fast.scoring.config import as_judge_config

    judge = rank_share(as_judge_config(judge_cfg or {"type": "rule"}).to_dict(), world_size)
    scoring = {k: v for k, v in _mapping(scoring_cfg).items() if v is not None}
    if "cache_path" not in scoring and run_dir is not None:
        scoring["cache_path"] = str(Path(run_dir) / "judge_cache" / "rank_{rank}.sqlite")
    if scoring.get("cache_path"):
        scoring["cache_path"] = str(scoring["cache_path"]).replace("{rank}", str(rank))
    # every group comes back, even one with too few valid members (its rewards are then excluded)
    config = {**scoring, "deliver_dropped": True, "judge": judge, "group_size": group_size}
    scorer = ServiceScorer(build_service(config), group_size)
    scorer.cache_path = scoring.get("cache_path")
    return scorer
