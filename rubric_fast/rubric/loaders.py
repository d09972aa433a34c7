"""Loaders: HealthBench jsonl, RaR jsonl/json, verl-style parquet, OpenRubrics text, rubric_fast jsonl.

Every loader returns ``list[Rubric]`` with the source record kept untouched in ``Rubric.source``, and
raises :class:`RubricError` naming the file, the line (jsonl) or row (parquet, 1-based) and the key.
:func:`load_rubrics` picks the loader from the extension and the keys of the first record.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from .schema import (
    CATEGORIES,
    KINDS,
    POLARITIES,
    Aggregation,
    Criterion,
    Rubric,
    RubricError,
    Tier,
    normalize_prompt,
)

FORMATS = ("auto", "healthbench", "rar", "verl", "openrubrics", "rubric_fast")


# ---------------------------------------------------------------------------------------------- helpers
def _iter_json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for jsonl; (index + 1, record) for a .json list."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RubricError(f"invalid JSON: {exc.msg}", source=str(path), line=exc.lineno) from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise RubricError("a .json rubric file must hold a list of records", source=str(path))
        yield from ((i + 1, r) for i, r in enumerate(data))
        return
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except json.JSONDecodeError as exc:
                raise RubricError(f"invalid JSON: {exc.msg} (column {exc.colno})", source=str(path),
                                  line=lineno) from None


def _number(value: Any, *, src: str, line: int, key: str, allow_negative: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise RubricError(f"must be a number, got {value!r}", source=src, line=line, key=key) from None
        else:
            raise RubricError(f"must be a number, got {value!r}", source=src, line=line, key=key)
    if not math.isfinite(value):
        raise RubricError(f"must be a finite number, got {value!r}", source=src, line=line, key=key)
    if value < 0 and not allow_negative:
        raise RubricError(f"must be >= 0, got {value!r}", source=src, line=line, key=key)
    return float(value)


def _require(rec: Any, key: str, *, src: str, line: int, prefix: str = "") -> Any:
    if not isinstance(rec, dict):
        raise RubricError(f"must be an object, got {type(rec).__name__}", source=src, line=line,
                          key=prefix.rstrip(".") or None)
    if key not in rec or rec[key] is None:
        raise RubricError("missing required key", source=src, line=line, key=prefix + key)
    return rec[key]


def _list(value: Any, *, src: str, line: int, key: str) -> list:
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, list):
        raise RubricError(f"must be a list, got {type(value).__name__}", source=src, line=line, key=key)
    if not value:
        raise RubricError("no criteria", source=src, line=line, key=key)
    return value


def _tags(value: Any, *, src: str, line: int, key: str) -> list[str]:
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise RubricError("must be a list of strings", source=src, line=line, key=key)
    return list(value)


def points_item_fields(it: dict, i: int) -> dict:
    """The one HealthBench / verl points mapping: ``{criterion, points}`` -> criterion fields (negative points:
    a penalize-if-met pitfall of weight |points|). Used by the loaders and the trainer adapters."""
    pts = it["points"]
    return {"id": str(it.get("id") or f"c{i}"), "text": it["criterion"], "weight": abs(pts),
            "polarity": "penalize_if_met" if pts < 0 else "reward_if_met",
            "category": "pitfall" if pts < 0 else "important"}


def _points_criteria(items: list, *, src: str, line: int, key: str) -> list[Criterion]:
    """HealthBench / verl: [{criterion, points, tags}]; negative points mean penalize-if-met."""
    out = []
    for i, it in enumerate(items):
        k = f"{key}[{i}]"
        text = _require(it, "criterion", src=src, line=line, prefix=k + ".")
        if not isinstance(text, str) or not text.strip():
            raise RubricError("must be a non-empty string", source=src, line=line, key=f"{k}.criterion")
        pts = _number(_require(it, "points", src=src, line=line, prefix=k + "."), src=src, line=line,
                      key=f"{k}.points", allow_negative=True)
        out.append(Criterion(**points_item_fields({**it, "points": pts}, i), weight_raw=it["points"], kind="principle",
                             tags=_tags(it.get("tags"), src=src, line=line, key=f"{k}.tags")))
    return out


def _finish(rubrics: list[Rubric], *, src: str, lines: list[int]) -> list[Rubric]:
    for r, ln in zip(rubrics, lines):
        r.validate(source=src, line=ln)
        r.location = f"{src}:{ln}"
    return rubrics


# ---------------------------------------------------------------------------------------------- HealthBench
def load_healthbench(path: str | Path) -> list[Rubric]:
    """HealthBench jsonl: {prompt: [messages], rubrics: [{criterion, points, tags}], prompt_id?, ...}.

    Aggregation is ``healthbench``: the sum of met points over the sum of positive points, clipped to [0, 1].
    """
    path, src = Path(path), str(path)
    out, lines = [], []
    for line, rec in _iter_json_records(path):
        prompt = normalize_prompt(_require(rec, "prompt", src=src, line=line), source=src, line=line)
        crit = _points_criteria(_list(_require(rec, "rubrics", src=src, line=line), src=src, line=line,
                                      key="rubrics"), src=src, line=line, key="rubrics")
        ref = rec.get("ideal_completion") or rec.get("reference_answer")
        rid = str(rec.get("prompt_id") or rec.get("example_id") or f"{path.stem}:{line}")
        out.append(Rubric(id=rid, prompt=prompt, criteria=crit, reference_answer=ref,
                          aggregation=Aggregation(method="healthbench", clip=True),
                          source_format="healthbench", source=rec))
        lines.append(line)
    return _finish(out, src=src, lines=lines)


# ---------------------------------------------------------------------------------------------- RaR
_RAR_PREFIX = re.compile(r"^\s*(essential|important|optional|pitfall)\s+criteri(?:a|on)\s*:\s*", re.I)
# A pitfall phrased as avoidance ("Does not recommend X") is met when the response is good.
_AVOIDANCE = re.compile(r"^\s*(does\s+not|doesn't|do\s+not|avoids?|never|refrains?|is\s+not|isn't|"
                        r"not\s|no\s|without\s|must\s+not|should\s+not|excludes?)\b", re.I)
# A pitfall phrased as the mistake itself ("Recommends X", "Claims that ...") is met when the response is bad.
_AFFIRMATIVE_MISTAKE = re.compile(r"^\s*(mentions?|states?|claims?|includes?|recommends?|suggests?|uses?|"
                                  r"provides?|gives?|confuses?|incorrectly|wrongly|misidentifies|"
                                  r"fails\s+to|omits?|ignores?|overlooks?|asserts?|presents?|contains?|"
                                  r"relies|treats?|says?)\b", re.I)


def rar_polarity(category: str, description: str, weight: float) -> str:
    """RaR polarity rule: non-pitfalls reward-if-met; pitfalls by phrasing (see module docstring)."""
    if category != "pitfall":
        return "penalize_if_met" if weight < 0 else "reward_if_met"
    if _AVOIDANCE.match(description):  # phrasing wins over the sign: "Does not ..." (weight -1) is met when good
        return "reward_if_met"
    if weight < 0 or _AFFIRMATIVE_MISTAKE.match(description):
        return "penalize_if_met"
    return "unknown"


def load_rar(path: str | Path, *, verbose: bool = True) -> list[Rubric]:
    """RaR (Rubrics as Rewards) jsonl/json: {question, reference_answer, rubric: [{title, description, weight}]}.

    The category comes from the description's prefix ("Essential Criteria: ..."); pitfalls phrased as
    avoidance ("Does not ...", "Avoids ...") are reward-if-met, pitfalls phrased as the mistake
    ("Recommends ...", "Claims ...") or with a negative weight are penalize-if-met, the rest unknown.
    The count of each polarity is printed (stderr) when ``verbose``.
    """
    path, src = Path(path), str(path)
    out, lines, counts = [], [], Counter()
    for line, rec in _iter_json_records(path):
        q = _require(rec, "question", src=src, line=line)
        if not isinstance(q, str):
            raise RubricError("must be a string", source=src, line=line, key="question")
        items = _list(_require(rec, "rubric", src=src, line=line), src=src, line=line, key="rubric")
        crit = []
        for i, it in enumerate(items):
            k = f"rubric[{i}]"
            desc = _require(it, "description", src=src, line=line, prefix=k + ".")
            if not isinstance(desc, str) or not desc.strip():
                raise RubricError("must be a non-empty string", source=src, line=line, key=f"{k}.description")
            w = _number(_require(it, "weight", src=src, line=line, prefix=k + "."), src=src, line=line,
                        key=f"{k}.weight", allow_negative=True)
            m = _RAR_PREFIX.match(desc)
            category = m.group(1).lower() if m else "important"
            body = desc[m.end():] if m else desc
            pol = rar_polarity(category, body, w)
            counts[pol] += category == "pitfall"
            crit.append(Criterion(id=str(it.get("id") or f"c{i}"), text=body.strip(), weight=abs(w),
                                  weight_raw=it["weight"], polarity=pol, category=category,
                                  kind="principle", tags=[it["title"]] if isinstance(it.get("title"), str) else []))
        out.append(Rubric(id=str(rec.get("id") or f"{path.stem}:{line}"), prompt=normalize_prompt(q),
                          criteria=crit, reference_answer=rec.get("reference_answer"),
                          aggregation=Aggregation(method="weighted_mean"), source_format="rar", source=rec))
        lines.append(line)
    if verbose:
        print(f"[rubric_fast] {src}: RaR pitfall polarity: {counts['reward_if_met']} reward-if-met (avoidance), "
              f"{counts['penalize_if_met']} penalize-if-met, {counts['unknown']} unknown", file=sys.stderr)
    return _finish(out, src=src, lines=lines)


# ---------------------------------------------------------------------------------------------- verl parquet
def load_verl_parquet(path: str | Path) -> list[Rubric]:
    """verl-style parquet: columns ``prompt`` (messages or string) and ``reward_model`` (struct) with
    ``rubrics: [{criterion, points, tags}]`` and an optional ``ground_truth`` used as reference answer."""
    import pyarrow.parquet as pq

    path, src = Path(path), str(path)
    table = pq.read_table(path)
    for col in ("prompt", "reward_model"):
        if col not in table.column_names:
            raise RubricError(f"missing column; columns are {table.column_names}", source=src, key=col)
    out, lines = [], []
    for row, rec in enumerate(table.to_pylist(), 1):
        prompt = normalize_prompt(rec["prompt"], source=src, line=row)
        rm = _require(rec, "reward_model", src=src, line=row)
        crit = _points_criteria(_list(_require(rm, "rubrics", src=src, line=row, prefix="reward_model."),
                                      src=src, line=row, key="reward_model.rubrics"),
                                src=src, line=row, key="reward_model.rubrics")
        extra = rec.get("extra_info") or {}
        rid = str(extra.get("index") if isinstance(extra, dict) and extra.get("index") is not None
                  else f"{path.stem}:{row}")
        out.append(Rubric(id=rid, prompt=prompt, criteria=crit, reference_answer=rm.get("ground_truth"),
                          aggregation=Aggregation(method="healthbench", clip=True), source_format="verl",
                          source=rec))
        lines.append(row)
    return _finish(out, src=src, lines=lines)


# ---------------------------------------------------------------------------------------------- OpenRubrics
_OR_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•])?\s*(?:\[(?P<pre>hard rule|principle)\]\s*:?\s*)?(?P<text>.*?)"
                      r"\s*(?:\[(?P<post>hard rule|principle)\])?\s*$", re.I)


def parse_openrubrics_text(text: str, *, source: str | None = None, line: int | None = None) -> list[Criterion]:
    """Items tagged ``[Hard Rule]`` or ``[Principle]`` (before or after the text), one per line.

    Hard rules become gates (kind ``hard_rule``, category ``essential``); principles are ``important``.
    Lines without a tag continue the previous item.
    """
    crit: list[Criterion] = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        m = _OR_ITEM.match(raw)
        tag = (m.group("pre") or m.group("post") or "").lower() if m else ""
        if not tag:
            if crit:
                crit[-1].text += " " + raw.strip()
                continue
            raise RubricError(f"expected an item tagged [Hard Rule] or [Principle], got {raw.strip()[:60]!r}",
                              source=source, line=line, key="rubric")
        hard = tag == "hard rule"
        crit.append(Criterion(id=f"c{len(crit)}", text=m.group("text").strip(), weight=1.0, weight_raw=None,
                              polarity="reward_if_met", category="essential" if hard else "important",
                              kind="hard_rule" if hard else "principle"))
    if not crit:
        raise RubricError("no criteria", source=source, line=line, key="rubric")
    return crit


def load_openrubrics(path: str | Path) -> list[Rubric]:
    """OpenRubrics jsonl: {prompt | instruction, rubric: "1. ... [Hard Rule]\\n2. ... [Principle]", reference?}."""
    path, src = Path(path), str(path)
    out, lines = [], []
    for line, rec in _iter_json_records(path):
        p = rec.get("prompt", rec.get("instruction")) if isinstance(rec, dict) else None
        if p is None:
            raise RubricError("missing required key (also accepted: 'instruction')", source=src, line=line,
                              key="prompt")
        text = _require(rec, "rubric", src=src, line=line)
        if not isinstance(text, str):
            raise RubricError("must be the rubric text", source=src, line=line, key="rubric")
        crit = parse_openrubrics_text(text, source=src, line=line)
        out.append(Rubric(id=str(rec.get("id") or f"{path.stem}:{line}"),
                          prompt=normalize_prompt(p, source=src, line=line), criteria=crit,
                          reference_answer=rec.get("reference") or rec.get("reference_answer"),
                          aggregation=Aggregation(method="weighted_mean", hard_rule_gate=True),
                          source_format="openrubrics", source=rec))
        lines.append(line)
    return _finish(out, src=src, lines=lines)


# ---------------------------------------------------------------------------------------------- rubric_fast
_CRITERION_KEYS = {"id", "text", "weight", "polarity", "category", "kind", "tiers", "veto", "verifier",
                   "verifier_params", "tags"}
_RECORD_KEYS = {"id", "prompt", "reference_answer", "criteria", "aggregation", "meta"}


def criterion_from_dict(d: Any, index: int, *, src: str | None = None, line: int | None = None) -> Criterion:
    """A rubric_fast criterion; ``verifier`` may also be a rule check name (``regex``) as a shorthand for
    ``verifier: rule, verifier_params: {check: regex, ...}``."""
    from .rules import RULE_CHECKS

    k = f"criteria[{index}]"
    if not isinstance(d, dict):
        raise RubricError(f"must be an object, got {type(d).__name__}", source=src, line=line, key=k)
    unknown = set(d) - _CRITERION_KEYS
    if unknown:
        raise RubricError(f"unknown key(s) {sorted(unknown)}; accepted: {sorted(_CRITERION_KEYS)}",
                          source=src, line=line, key=k)
    text = _require(d, "text", src=src, line=line, prefix=k + ".")
    weight_raw = d.get("weight", 1.0)
    weight = _number(weight_raw, src=src, line=line, key=f"{k}.weight", allow_negative=False)
    verifier = d.get("verifier", "llm")
    params = dict(d.get("verifier_params") or {})
    if verifier in RULE_CHECKS:
        params.setdefault("check", verifier)
        verifier = "rule"
    elif verifier not in ("llm", "rule", "embedding"):
        raise RubricError(f"unknown verifier {verifier!r}; accepted: llm, rule, embedding, or a rule check "
                          f"({', '.join(sorted(RULE_CHECKS))})", source=src, line=line, key=f"{k}.verifier")
    tiers = d.get("tiers")
    if tiers is not None:
        if not isinstance(tiers, list):
            raise RubricError("must be a list of {score, description}", source=src, line=line, key=f"{k}.tiers")
        try:
            tiers = [Tier(score=float(t["score"]), description=str(t["description"])) for t in tiers]
        except (KeyError, TypeError, ValueError):
            raise RubricError("each tier needs a numeric 'score' and a 'description'", source=src, line=line,
                              key=f"{k}.tiers") from None
    for name, allowed in (("polarity", POLARITIES), ("category", CATEGORIES), ("kind", KINDS)):
        if name in d and d[name] not in allowed:
            raise RubricError(f"must be one of {', '.join(allowed)}; got {d[name]!r}", source=src, line=line,
                              key=f"{k}.{name}")
    return Criterion(
        id=str(d.get("id", f"c{index}")), text=text, weight=weight, weight_raw=weight_raw,
        polarity=d.get("polarity", "reward_if_met"), category=d.get("category", "important"),
        kind=d.get("kind", "principle"), tiers=tiers, veto=d.get("veto", False), verifier=verifier,
        verifier_params=params, tags=_tags(d.get("tags"), src=src or "", line=line or 0, key=f"{k}.tags"),
    )


def rubric_from_dict(rec: Any, *, src: str | None = None, line: int | None = None,
                     default_id: str | None = None) -> Rubric:
    """One rubric_fast record (see ``examples/rubrics/README.md`` for the format)."""
    if not isinstance(rec, dict):
        raise RubricError(f"a record must be an object, got {type(rec).__name__}", source=src, line=line)
    unknown = set(rec) - _RECORD_KEYS
    if unknown:
        raise RubricError(f"unknown key(s) {sorted(unknown)}; accepted: {sorted(_RECORD_KEYS)}",
                          source=src, line=line)
    prompt = normalize_prompt(_require(rec, "prompt", src=src or "", line=line or 0), source=src, line=line)
    items = _list(_require(rec, "criteria", src=src or "", line=line or 0), src=src or "", line=line or 0,
                  key="criteria")
    crit = [criterion_from_dict(c, i, src=src, line=line) for i, c in enumerate(items)]
    ref = rec.get("reference_answer")
    if ref is not None and not isinstance(ref, str):
        raise RubricError("must be a string or null", source=src, line=line, key="reference_answer")
    r = Rubric(id=str(rec.get("id", default_id or f"{line}")), prompt=prompt, criteria=crit,
               reference_answer=ref,
               aggregation=Aggregation.from_dict(rec.get("aggregation"), source=src, line=line),
               source_format="rubric_fast", source=rec)
    r.validate(source=src, line=line)
    if src is not None:
        r.location = f"{src}:{line}" if line is not None else src
    return r


def load_rubric_fast(path: str | Path) -> list[Rubric]:
    path, src = Path(path), str(path)
    return [rubric_from_dict(rec, src=src, line=line, default_id=f"{path.stem}:{line}")
            for line, rec in _iter_json_records(path)]


# ---------------------------------------------------------------------------------------------- dispatch
LOADERS = {"healthbench": load_healthbench, "rar": load_rar, "verl": load_verl_parquet,
           "openrubrics": load_openrubrics, "rubric_fast": load_rubric_fast}


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.suffix == ".parquet":
        return "verl"
    for line, rec in _iter_json_records(path):
        if not isinstance(rec, dict):
            break
        if "criteria" in rec:
            return "rubric_fast"
        if "rubrics" in rec:
            return "healthbench"
        if isinstance(rec.get("rubric"), list):
            return "rar"
        if isinstance(rec.get("rubric"), str):
            return "openrubrics"
        raise RubricError("cannot tell the rubric format from the keys "
                          f"{sorted(rec)}; pass format= one of {', '.join(FORMATS[1:])}", source=str(path),
                          line=line)
    raise RubricError("no records", source=str(path))


def load_rubrics(path: str | Path, format: str = "auto") -> list[Rubric]:
    """Load every rubric of a file; ``format`` is one of :data:`FORMATS`."""
    if not Path(path).exists():
        raise FileNotFoundError(f"rubric file not found: {path}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    fmt = detect_format(path) if format == "auto" else format
    rubrics = LOADERS[fmt](path)
    if not rubrics:
        raise RubricError("no records", source=str(path))
    return rubrics
