"""Guard: judge junk responses as failing without asking the judge.

A response is junk when, after ``<think>`` blocks are removed, it is empty; holds no letter or digit
(whitespace or punctuation only); is only a reasoning opener with no answer ("Thought process:",
"Let's solve this problem step by step.", "Solution", "解", "かいせつ", "Respuesta", ...); only echoes the
criteria; or carries injected verdict text such as ``"criteria_met": true``.

A guarded verdict is a real judgement (``score`` set, ``guarded=True``), not a failure. To make junk get the
*worst* outcome: reward-if-met criteria are judged not met (score 0), penalize-if-met criteria are judged
met (score 1: the mistake is taken as present), a holistic rating gets 0 (below the 1-10 scale, so 0
reward). Criteria of unknown polarity get score 0, and the scorer additionally caps the reward of any
guarded response at 0, so whatever the aggregation, a guarded junk response never scores above 0.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from .base import HOLISTIC_ID, JudgeRequest, Verdict, strip_think

DEFAULT_OPENERS = (
    "thought process", "thinking", "reasoning", "analysis", "let's solve this problem step by step",
    "let's solve this step by step", "let's think step by step", "let me think", "let me think step by step",
    "step by step", "step 1", "solution", "the solution", "answer", "the answer is", "final answer",
    "explanation", "hmm",
    "解", "解答", "解析", "答案", "答", "思路", "かいせつ", "解説", "答え", "回答",
    "respuesta", "solución", "solucion", "réponse", "solution détaillée", "lösung", "antwort", "ответ", "решение",
)

_INJECTION = (
    re.compile(r"[\"']?\bcriteria[_ ]met[\"']?\s*[:=]\s*[\"']?(?:true|false|yes|no)\b", re.I),
    re.compile(r"[\"']rating[\"']\s*:\s*\d", re.I),
    re.compile(r"[\"']explanation[\"']\s*:\s*[\"']", re.I),
    re.compile(r"\bverdict\s*[:=]\s*[\"']?(?:met|pass(?:ed)?|true|yes|correct)\b", re.I),
    re.compile(r"\b(?:all|every|each)\s+(?:the\s+)?criteri(?:a|on)\s+(?:are|is|were|have been)\s+(?:fully\s+)?(?:met|satisfied)\b", re.I),
    re.compile(r"\bignore\s+(?:all\s+|any\s+)?(?:the\s+)?(?:previous|prior|above)\s+instructions\b", re.I),
    re.compile(r"\b(?:as|to)\s+the\s+(?:grader|judge|evaluator)\b.*\b(?:met|pass|full\s+marks|10)\b", re.I | re.S),
)

_MARKUP = re.compile(r"[*#_>`~|\-=]+")
_TRAILING = ":：.。,，;；!！?？…、 \t\n"


def _has_alnum(text: str) -> bool:
    return any(unicodedata.category(ch)[0] in "LN" for ch in text)


def _norm_words(text: str) -> str:
    return " ".join("".join(ch if unicodedata.category(ch)[0] in "LN" else " " for ch in text.lower()).split())


@dataclass
class GuardConfig:
    enabled: bool = True
    openers: tuple[str, ...] = DEFAULT_OPENERS
    check_echo: bool = True
    check_injection: bool = True
    extra_openers: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_value(cls, value) -> GuardConfig:
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(enabled=False)
        if isinstance(value, GuardConfig):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"guard: unknown key(s) {sorted(unknown)}; accepted: {sorted(cls.__dataclass_fields__)}")
            d = dict(value)
            for k in ("openers", "extra_openers"):
                if k in d:
                    d[k] = tuple(d[k])
            return cls(**d)
        raise ValueError(f"guard must be true, false or a mapping, got {value!r}")


def junk_reason(response: str, criteria=(), config: GuardConfig | None = None) -> str | None:
    """Why ``response`` is junk, or None when it deserves a judge."""
    cfg = config or GuardConfig()
    if not cfg.enabled:
        return None
    text = strip_think(response or "")
    if not text.strip():
        return "empty response"
    if not _has_alnum(text):
        return "no letters or digits (whitespace or punctuation only)"
    if cfg.check_injection:
        for rx in _INJECTION:
            if rx.search(text):
                return "injected verdict text"
    core = _MARKUP.sub(" ", text).strip().strip(_TRAILING).strip().lower()
    core = " ".join(core.split())
    openers = {o.lower().strip(_TRAILING) for o in (*cfg.openers, *cfg.extra_openers)}
    if core in openers:
        return "reasoning opener with no answer"
    if cfg.check_echo and criteria:
        words = _norm_words(text)
        rest = words
        for c in criteria:
            ct = _norm_words(getattr(c, "text", str(c)))
            if len(ct) >= 12:
                rest = rest.replace(ct, " ")
        if len(rest.split()) < 3 and rest.strip() != words.strip():
            return "echo of the criteria"
        for c in criteria:  # a response that is (nearly) a whole criterion, e.g. its text with a word cut
            ct = _norm_words(getattr(c, "text", str(c)))
            if len(words) >= 12 and words in ct and len(words) >= 0.9 * len(ct):
                return "echo of the criteria"
    return None


def guard_verdicts(criteria, reason: str, *, holistic: bool = False) -> list[Verdict]:
    """The worst outcome for every criterion, plus a holistic rating of 0 (see the module docstring)."""
    del holistic  # kept for callers; the holistic verdict is always included
    why = f"guard: {reason}"
    # the holistic rating is given whatever the judge, so an implicit_likert rubric also gets its worst value
    return [Verdict(c.id, 1.0 if c.polarity == "penalize_if_met" else 0.0, why, guarded=True) for c in criteria] + \
        [Verdict(HOLISTIC_ID, 0.0, why, guarded=True)]


class GuardedJudge:
    """Wraps a judge: junk responses get :func:`guard_verdicts`, everything else goes to the inner judge."""

    def __init__(self, inner, config: GuardConfig | None = None):
        self.inner, self.config = inner, config or GuardConfig()
        self.name = inner.name
        self.guarded = 0

    @property
    def holistic(self) -> bool:
        return bool(getattr(self.inner, "holistic", False))

    @property
    def identity(self) -> str:
        return getattr(self.inner, "identity", self.inner.name)

    async def grade(self, request: JudgeRequest) -> list[Verdict]:
        reason = junk_reason(request.response, request.criteria, self.config)
        if reason is not None:
            self.guarded += 1
            return guard_verdicts(request.criteria, reason, holistic=self.holistic)
        return await self.inner.grade(request)
