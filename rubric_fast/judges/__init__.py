"""Judges behind one async protocol: rule, http (OpenAI-compatible), hf (local model), embedding; guard.

``HttpJudge``, ``HFJudge`` and ``EmbeddingJudge`` are imported lazily (they pull in httpx, torch,
transformers): ``from rubric_fast.judges.http import HttpJudge``. Build judges from a plain config with
:func:`rubric_fast.scoring.build_judge`.
"""

from .base import (
    HOLISTIC_ID,
    CallTimeout,
    ClientError,
    DeadlineExceeded,
    Judge,
    JudgeCallError,
    JudgeRequest,
    RateLimited,
    ServerError,
    TransportError,
    Verdict,
    strip_think,
)
from .chat import MODES, ChatJudge
from .guard import GuardConfig, GuardedJudge, guard_verdicts, junk_reason
from .prompts import TEMPLATE_VERSION, ParseError
from .routing import CountingJudge, RoutingJudge
from .rule import RULE_CHECKS, RuleJudge, run_rule, validate_rule_params


def __getattr__(name):  # lazy heavy judges
    if name == "HttpJudge":
        from .http import HttpJudge
        return HttpJudge
    if name == "HFJudge":
        from .hf import HFJudge
        return HFJudge
    if name == "EmbeddingJudge":
        from .embedding import EmbeddingJudge
        return EmbeddingJudge
    raise AttributeError(name)


__all__ = [
    "HOLISTIC_ID", "CallTimeout", "ClientError", "DeadlineExceeded", "Judge", "JudgeCallError", "JudgeRequest",
    "RateLimited", "ServerError", "TransportError", "Verdict", "strip_think", "MODES", "ChatJudge",
    "GuardConfig", "GuardedJudge", "guard_verdicts", "junk_reason", "TEMPLATE_VERSION", "ParseError",
    "CountingJudge", "RoutingJudge", "RULE_CHECKS", "RuleJudge", "run_rule", "validate_rule_params",
    "HttpJudge", "HFJudge", "EmbeddingJudge",
]
