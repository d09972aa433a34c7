"""What a judge answers about one criterion (the rubric's aggregators read it; the judges write it).

A failed judgement has ``score=None`` and an ``error``; it is never 0.
"""

from __future__ import annotations

from dataclasses import dataclass

HOLISTIC_ID = "__holistic__"


@dataclass
class Verdict:
    criterion_id: str
    score: float | None          # in [0, 1]: 1 = the criterion statement holds; None = no judgement
    reason: str = ""
    error: str | None = None
    cached: bool = False
    guarded: bool = False        # decided by the guard without asking the judge

    @property
    def ok(self) -> bool:
        return self.score is not None
