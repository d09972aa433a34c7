"""Composite judges: route criteria to judges by ``verifier``; count the calls a judge receives."""

from __future__ import annotations

import asyncio
from collections import Counter

from .base import JudgeRequest, Verdict, failed


class RoutingJudge:
    """Sends each criterion to the judge registered for its ``verifier`` (``llm``, ``rule``, ``embedding``)
    and merges the verdicts in criterion order; a verifier without a judge gets a failed verdict."""

    def __init__(self, judges: dict[str, object], name: str | None = None):
        if not judges:
            raise ValueError("RoutingJudge needs at least one judge")
        self.judges = judges
        self.name = name or "+".join(f"{k}={getattr(j, 'name', '?')}" for k, j in sorted(judges.items()))

    @property
    def holistic(self) -> bool:
        return any(getattr(j, "holistic", False) for j in self.judges.values())

    @property
    def identity(self) -> str:
        return "|".join(f"{k}={getattr(j, 'identity', getattr(j, 'name', '?'))}" for k, j in sorted(self.judges.items()))

    async def grade(self, request: JudgeRequest) -> list[Verdict]:
        groups: dict[str, list] = {}
        for c in request.criteria:
            groups.setdefault(c.verifier, []).append(c)
        calls, names = [], []
        out: list[Verdict] = []
        for verifier, crit in groups.items():
            judge = self.judges.get(verifier)
            if judge is None:
                out += failed(crit, f"no judge configured for verifier {verifier!r} "
                                    f"(configured: {', '.join(sorted(self.judges))})")
                continue
            sub = JudgeRequest(request.rollout_id, request.prompt, request.response, crit,
                               request.reference_answer, request.deadline_s, request.meta)
            calls.append(judge.grade(sub))
            names.append(verifier)
        for res in await asyncio.gather(*calls):
            out += res
        return out


class CountingJudge:
    """Counts what reaches the inner judge: ``requests`` (grade calls), ``criteria_requested`` and the
    per-criterion tally ``requested[(rollout_id, criterion_id)]``. Use it to prove that cached verdicts
    are not requested again (resume)."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.requests = 0
        self.criteria_requested = 0
        self.requested: Counter = Counter()

    @property
    def holistic(self) -> bool:
        return bool(getattr(self.inner, "holistic", False))

    @property
    def identity(self) -> str:
        return getattr(self.inner, "identity", self.inner.name)

    async def grade(self, request: JudgeRequest) -> list[Verdict]:
        self.requests += 1
        self.criteria_requested += len(request.criteria)
        for c in request.criteria:
            self.requested[(request.rollout_id, c.id)] += 1
        return await self.inner.grade(request)
