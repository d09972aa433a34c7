"""One record type for every rubric format: :class:`Rubric` with its :class:`Criterion` list.

Conventions (shared by loaders, judges and aggregators):

* ``weight`` is always >= 0; the sign found in the source (HealthBench's negative points) is kept in
  ``weight_raw`` and turned into ``polarity``.
* ``polarity``: ``reward_if_met`` (met is good), ``penalize_if_met`` (met is bad: a pitfall that happened)
  or ``unknown`` (the loader could not tell; the aggregator drops it by default and says so in its detail).
* A judge's verdict says whether the criterion *statement* holds for the response (HealthBench style),
  never whether that is good: polarity is applied by the aggregator only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .shaping import DIMENSION_KEYS, SATURATIONS, SHAPINGS

POLARITIES = ("reward_if_met", "penalize_if_met", "unknown")
CATEGORIES = ("essential", "important", "optional", "pitfall")
KINDS = ("hard_rule", "principle", "dimension")
VERIFIERS = ("llm", "rule", "embedding")
AGGREGATION_METHODS = ("healthbench", "weighted_mean", "implicit_likert", "rubicon")
UNKNOWN_POLARITY_MODES = ("drop", "reward_if_met", "penalize_if_met")


class RubricError(ValueError):
    """A rubric record is malformed. The message names the file, the line (or row) and the key."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 key: str | None = None):
        where = []
        if source is not None:
            where.append(str(source) + (f":{line}" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if key is not None:
            where.append(f"key '{key}'")
        self.source, self.line, self.key = source, line, key
        super().__init__((": ".join(where) + ": " if where else "") + message)


@dataclass
class Tier:
    """One level of an ordinal criterion (e.g. 0 = absent, 0.5 = partial, 1 = complete)."""

    score: float
    description: str


@dataclass
class Criterion:
    id: str
    text: str
    weight: float = 1.0
    weight_raw: Any = None
    polarity: str = "reward_if_met"
    category: str = "important"
    kind: str = "principle"
    tiers: list[Tier] | None = None
    veto: bool = False
    verifier: str = "llm"
    verifier_params: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)

    def validate(self, *, source: str | None = None, line: int | None = None, key: str = "criteria") -> None:
        def bad(sub: str, msg: str) -> RubricError:
            return RubricError(msg, source=source, line=line, key=f"{key}.{sub}")

        if not isinstance(self.id, str) or not self.id:
            raise bad("id", f"must be a non-empty string, got {self.id!r}")
        if not isinstance(self.text, str) or not self.text.strip():
            raise bad("text", f"must be a non-empty string, got {self.text!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise bad("weight", f"must be a number >= 0, got {self.weight!r}")
        if not math.isfinite(self.weight) or self.weight < 0:
            raise bad("weight", f"must be a finite number >= 0, got {self.weight!r}")
        for name, allowed in (("polarity", POLARITIES), ("category", CATEGORIES), ("kind", KINDS),
                              ("verifier", VERIFIERS)):
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not isinstance(self.veto, bool):
            raise bad("veto", f"must be true or false, got {self.veto!r}")
        if self.tiers is not None:
            if not self.tiers:
                raise bad("tiers", "must be a non-empty list when given")
            for t in self.tiers:
                if not math.isfinite(t.score) or not 0.0 <= t.score <= 1.0:
                    raise bad("tiers", f"tier scores must lie in [0, 1], got {t.score!r}")
        if self.verifier == "rule":
            from .rules import validate_rule_params

            try:
                validate_rule_params(self.verifier_params)
            except ValueError as exc:
                raise bad("verifier_params", str(exc)) from None


@dataclass
class Aggregation:
    """How a reward is computed from verdicts (see :mod:`rubric_fast.rubric.aggregate`)."""

    method: str = "weighted_mean"
    clip: bool = True                                 # healthbench: clip the per-sample score to [0, 1]
    category_weights: dict[str, float] | None = None  # weighted_mean: multiply weights by category
    hard_rule_gate: bool = True                       # a failed hard rule gives reward 0
    unknown_polarity: str = "drop"                    # what an ``unknown`` polarity counts as
    likert_min: float = 1.0
    likert_max: float = 10.0
    # rubicon (rubric_fast.rubric.shaping, docs/methods.md): per-dimension saturation, then a final shaping
    dimension_key: str = "criterion"                  # criterion | category: what one dimension is
    saturation: str = "none"                          # none | cap | exp
    saturation_cap: float = 1.0                       # cap: min(s_d, cap)
    saturation_tau: float = 1.0                       # exp: 1 - exp(-s_d / tau)
    shaping: str = "none"                             # none | power | exp
    shaping_power: float = 2.0                        # power: R0 ** p
    shaping_alpha: float = 3.0                        # exp: (exp(alpha R0) - 1) / (exp(alpha) - 1)

    def validate(self, *, source: str | None = None, line: int | None = None, key: str = "aggregation") -> None:
        if self.method not in AGGREGATION_METHODS:
            raise RubricError(f"must be one of {', '.join(AGGREGATION_METHODS)}; got {self.method!r}",
                              source=source, line=line, key=f"{key}.method")
        if self.unknown_polarity not in UNKNOWN_POLARITY_MODES:
            raise RubricError(f"must be one of {', '.join(UNKNOWN_POLARITY_MODES)}; got {self.unknown_polarity!r}",
                              source=source, line=line, key=f"{key}.unknown_polarity")
        for cat, w in (self.category_weights or {}).items():
            if cat not in CATEGORIES:
                raise RubricError(f"unknown category {cat!r}; accepted: {', '.join(CATEGORIES)}",
                                  source=source, line=line, key=f"{key}.category_weights")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise RubricError(f"weight for {cat!r} must be a finite number >= 0, got {w!r}",
                                  source=source, line=line, key=f"{key}.category_weights.{cat}")
        if not self.likert_max > self.likert_min:
            raise RubricError("likert_max must be greater than likert_min", source=source, line=line,
                              key=f"{key}.likert_max")
        self._validate_rubicon(source=source, line=line, key=key)

    def _validate_rubicon(self, *, source: str | None, line: int | None, key: str) -> None:
        def bad(sub: str, msg: str) -> RubricError:
            return RubricError(msg, source=source, line=line, key=f"{key}.{sub}")

        for name, allowed in (("dimension_key", DIMENSION_KEYS), ("saturation", SATURATIONS), ("shaping", SHAPINGS)):
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name, lo, desc in (("saturation_cap", 0.0, "> 0"), ("saturation_tau", 0.0, "> 0"),
                               ("shaping_alpha", 0.0, "> 0"), ("shaping_power", 1.0, ">= 1 (a convex map)")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                    (v < lo if name == "shaping_power" else v <= lo):
                raise bad(name, f"must be a finite number {desc}, got {v!r}")
        if self.method != "rubicon":
            for name in ("saturation", "shaping"):
                if getattr(self, name) != "none":
                    raise bad(name, f"applies to method rubicon only (method is {self.method!r}); set "
                                    f"{key}.method: rubicon or remove {name}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, *, source: str | None = None, line: int | None = None,
                  key: str = "aggregation") -> Aggregation:
        if d is None:
            return cls()
        if isinstance(d, str):
            d = {"method": d}
        if not isinstance(d, dict):
            raise RubricError(f"must be an object or a method name, got {type(d).__name__}",
                              source=source, line=line, key=key)
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise RubricError(f"unknown key(s) {sorted(unknown)}; accepted: {sorted(known)}",
                              source=source, line=line, key=key)
        agg = cls(**d)
        agg.validate(source=source, line=line, key=key)
        return agg


@dataclass
class Rubric:
    """One prompt with its criteria: the unit that the scorer grades a response against."""

    id: str
    prompt: list[dict[str, str]]              # chat messages [{"role": ..., "content": ...}]
    criteria: list[Criterion]
    reference_answer: str | None = None
    aggregation: Aggregation = field(default_factory=Aggregation)
    source_format: str = "rubric_fast"
    source: Any = None                        # the untouched source record
    location: str | None = field(default=None, compare=False, repr=False)  # "file:line" it was read from

    def validate(self, *, source: str | None = None, line: int | None = None) -> None:
        if not self.criteria:
            raise RubricError("no criteria", source=source, line=line, key="criteria")
        seen = set()
        for i, c in enumerate(self.criteria):
            c.validate(source=source, line=line, key=f"criteria[{i}]")
            if c.id in seen:
                raise RubricError(f"duplicate criterion id {c.id!r}", source=source, line=line,
                                  key=f"criteria[{i}].id")
            seen.add(c.id)
        if self.aggregation.method != "implicit_likert" and not any(c.weight > 0 for c in self.criteria):
            raise RubricError("every criterion weight is 0: the reward would be undefined", source=source,
                              line=line, key="criteria")
        self.aggregation.validate(source=source, line=line)

    @property
    def prompt_text(self) -> str:
        return "\n".join(m.get("content", "") for m in self.prompt)


def normalize_prompt(prompt: Any, *, source: str | None = None, line: int | None = None,
                     key: str = "prompt") -> list[dict[str, str]]:
    """A string becomes one user message; a list must hold {role, content} messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RubricError("must not be empty", source=source, line=line, key=key)
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, dict) and "content" in prompt:
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RubricError(f"must be a string or a non-empty list of chat messages, got {type(prompt).__name__}",
                          source=source, line=line, key=key)
    out = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise RubricError("each message needs a string 'content'", source=source, line=line,
                              key=f"{key}[{i}]")
        role = m.get("role", "user")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise RubricError(f"role must be system, user, assistant, developer or tool; got {role!r}",
                              source=source, line=line, key=f"{key}[{i}].role")
        out.append({"role": role, "content": m["content"]})
    for i, m in enumerate(out):
        if m["role"] == "user" and not m["content"].strip():
            raise RubricError("must not be empty (a user message with no text)", source=source, line=line,
                              key=f"{key}[{i}].content")
    if not any(m["content"].strip() for m in out):
        raise RubricError("must not be empty (every message has empty content)", source=source, line=line, key=key)
    return out
