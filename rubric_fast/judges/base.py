"""The Judge protocol and the types that cross it.

A judge grades one response against some criteria and returns one :class:`Verdict` per criterion (or a
single verdict with id :data:`HOLISTIC_ID` for holistic judges). It never aggregates. A failed judgement
has ``score=None`` and an ``error``; it is never 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from rubric_fast.rubric.verdict import HOLISTIC_ID, Verdict  # noqa: F401  (defined with the rubric, below the judges)

if TYPE_CHECKING:
    from rubric_fast.rubric.schema import Criterion


@dataclass
class JudgeRequest:
    rollout_id: str
    prompt: list[dict[str, str]]
    response: str
    criteria: list[Criterion]
    reference_answer: str | None = None
    deadline_s: float | None = None   # absolute time.monotonic() after which retries stop
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Judge(Protocol):
    name: str

    async def grade(self, request: JudgeRequest) -> list[Verdict]: ...


# ------------------------------------------------------------------------------------------------ errors
class JudgeCallError(Exception):
    """A call to a judge backend failed; ``retryable`` says whether the pool may try again."""

    retryable = False
    kind = "error"

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class TransportError(JudgeCallError):
    retryable = True
    kind = "transport"


class RateLimited(JudgeCallError):
    retryable = True
    kind = "rate_limited"


class ServerError(JudgeCallError):
    retryable = True
    kind = "server"


class CallTimeout(JudgeCallError):
    retryable = True
    kind = "timeout"


class ClientError(JudgeCallError):
    kind = "client"


class DeadlineExceeded(JudgeCallError):
    kind = "deadline"


# ------------------------------------------------------------------------------------------------ text helpers
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S | re.I)


def strip_think(text: str) -> str:
    """Drop reasoning: ``<think>...</think>`` blocks, everything before a stray ``</think>`` (templates that
    put the opening tag in the prompt) and an unclosed ``<think>`` to the end."""
    text = _THINK_BLOCK.sub("", text)
    low = text.lower()
    close = low.rfind("</think>")
    if close != -1:
        text = text[close + len("</think>"):]
        low = text.lower()
    open_ = low.find("<think>")
    if open_ != -1:
        text = text[:open_]
    return text.strip()


def failed(criteria: list[Criterion], error: str, reason: str = "") -> list[Verdict]:
    return [Verdict(c.id, None, reason, error) for c in criteria]
