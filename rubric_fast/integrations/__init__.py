"""Adapters for other trainers. Each submodule is imported on its own (none is imported here):

* :mod:`rubric_fast.integrations.hf`: ``hidden_states_and_head(model, input_ids, attention_mask)`` ->
  (last hidden states, LM-head weight, bias) of any linear-head ``AutoModelForCausalLM``: the input of
  ``rubric_fast.ops.linear_logprob_entropy`` / ``fused_linear_policy_loss`` in a home-grown loop.
* :mod:`rubric_fast.integrations.trl`: ``RubricReward`` / ``AsyncRubricReward`` (TRL reward functions backed
  by rubrics, judges and the streaming scorer) and ``RubricFastGRPOTrainer`` (TRL's ``GRPOTrainer`` with its
  loss computed by ``fused_linear_policy_loss``).
* :mod:`rubric_fast.integrations.verl`: ``compute_score`` for verl's ``custom_reward_function`` hook.

This module holds what the TRL and verl adapters share and that needs neither TRL nor verl: turning a
dataset cell into a :class:`~rubric_fast.rubric.Rubric` (:func:`rubric_from_value`, with the loaders'
HealthBench points mapping), the text of a completion (:func:`response_text`), and the scoring service
for synchronous callers (:class:`BackgroundScorer`).
See docs/integrations.md.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any

from rubric_fast.rubric.loaders import points_item_fields
from rubric_fast.scoring.scorer import score_all

__all__ = ["BackgroundScorer", "RubricCache", "build_scorer_from", "response_text", "rubric_from_value",
           "rubric_to_record", "score_all"]

_POINTS_AGGREGATION = {"method": "healthbench", "clip": True}


def _drop_none(x: Any) -> Any:
    """Arrow (``datasets``) stores a column of dicts as structs: every key of every row appears in every row,
    missing ones as None. In a rubric record None and absent mean the same, so drop them."""
    if isinstance(x, dict):
        return {k: _drop_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, (list, tuple)):
        return [_drop_none(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy arrays from pandas / parquet
        return _drop_none(x.tolist())
    return x


def _points_item_to_criterion(it: dict, i: int) -> dict:
    """A HealthBench / verl ``{criterion, points, tags}`` item as a rubric_fast criterion record (the loaders'
    own mapping, :func:`rubric_fast.rubric.loaders.points_item_fields`), keeping a rule verifier if given."""
    pts = it["points"]
    if isinstance(pts, bool) or not isinstance(pts, (int, float)):
        raise TypeError(f"criteria[{i}].points: must be a number, got {pts!r}")
    out = points_item_fields(it, i)
    if it.get("tags"):
        out["tags"] = list(it["tags"])
    for k in ("verifier", "verifier_params"):
        if k in it:
            out[k] = it[k]
    return out


def _criteria_list(items: list) -> tuple[list[dict], bool]:
    """(rubric_fast criterion dicts, whether they came as points items)."""
    if not items:
        raise ValueError("the criteria list is empty")
    points = [isinstance(c, dict) and "criterion" in c and "points" in c for c in items]
    if all(points):
        return [_points_item_to_criterion(c, i) for i, c in enumerate(items)], True
    out = []
    for i, c in enumerate(items):
        if isinstance(c, str):
            out.append({"id": f"c{i}", "text": c})
        elif isinstance(c, dict) and "text" in c:
            out.append(dict(c))
        else:
            raise ValueError(f"criteria[{i}]: expected a rubric_fast criterion {{text, weight, verifier, ...}}, "
                             f"a HealthBench/verl item {{criterion, points}} or a string; got {c!r:.120}")
    return out, False


def rubric_from_value(value: Any, *, prompt: Any = None, reference_answer: str | None = None,
                      where: str = "rubric"):
    """A :class:`~rubric_fast.rubric.Rubric` from what a dataset cell (or verl's ``ground_truth`` /
    ``extra_info``) may hold:

    * a ``Rubric``;
    * a rubric_fast record ``{id?, prompt?, criteria: [...], reference_answer?, aggregation?}`` as a dict or
      a JSON string (the format of ``examples/rubrics/*.jsonl``);
    * a list of criteria (dicts or JSON): rubric_fast criteria ``{text, weight?, verifier?, ...}``, plain
      strings (LLM-judged criteria), or HealthBench / verl items ``{criterion, points, tags?}`` (then the
      rubric aggregates with ``healthbench``);
    * a verl ``reward_model``-like dict ``{rubrics: [{criterion, points}], ground_truth?}``.

    ``prompt`` (a string or chat messages) fills a record without one, ``reference_answer`` one without a
    reference. Keys whose value is None are ignored (Arrow fills missing struct fields with None). Errors
    name ``where`` and say what is accepted.
    """
    from rubric_fast.rubric import Rubric, RubricError, rubric_from_dict

    if isinstance(value, Rubric):
        return value
    try:
        if isinstance(value, (str, bytes)):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg} at char {exc.pos}); expected a rubric record, "
                                 "a list of criteria or a Rubric") from None
        value = _drop_none(value)
        if isinstance(value, list):
            crit, points = _criteria_list(value)
            rec: dict[str, Any] = {"criteria": crit}
            if points:
                rec["aggregation"] = dict(_POINTS_AGGREGATION)
        elif isinstance(value, dict) and "criteria" in value:
            rec = dict(value)
            items = rec["criteria"]
            if isinstance(items, list) and items and all(isinstance(c, dict) and "points" in c
                                                         and "criterion" in c for c in items):
                rec["criteria"], _ = _criteria_list(items)
                rec.setdefault("aggregation", dict(_POINTS_AGGREGATION))
        elif isinstance(value, dict) and "rubrics" in value:
            crit, _ = _criteria_list(list(value["rubrics"]))
            rec = {"criteria": crit, "aggregation": dict(_POINTS_AGGREGATION)}
            gt = value.get("ground_truth")
            if isinstance(gt, str) and gt:
                rec["reference_answer"] = gt
            for k in ("id", "prompt"):
                if k in value:
                    rec[k] = value[k]
        elif value is None:
            raise ValueError("missing (None)")
        else:
            raise ValueError(f"expected a rubric record {{criteria: [...], ...}}, a list of criteria, a verl "
                             f"{{rubrics: [...]}} dict or a Rubric; got {type(value).__name__}: {value!r:.120}")
        if "prompt" not in rec or rec["prompt"] in ("", [], None):
            rec["prompt"] = _prompt_for_record(prompt)
        if reference_answer is not None and "reference_answer" not in rec:
            rec["reference_answer"] = str(reference_answer)
        if "id" not in rec:
            digest = hashlib.sha1(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:12]
            rec["id"] = f"rubric-{digest}"
        return rubric_from_dict(rec)
    except (RubricError, ValueError, KeyError, TypeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise RubricError(f"{where}: {msg}") from exc


def rubric_to_record(rubric) -> dict:
    """A :class:`~rubric_fast.rubric.Rubric` (from any loader) as a rubric_fast record dict, JSON-ready:
    ``rubric_from_value(json.dumps(rubric_to_record(r)))`` gives the same rubric back."""
    import dataclasses

    crit = []
    for c in rubric.criteria:
        d = {"id": c.id, "text": c.text, "weight": c.weight, "polarity": c.polarity, "category": c.category,
             "kind": c.kind, "veto": c.veto, "verifier": c.verifier}
        if c.verifier_params:
            d["verifier_params"] = dict(c.verifier_params)
        if c.tiers:
            d["tiers"] = [{"score": t.score, "description": t.description} for t in c.tiers]
        if c.tags:
            d["tags"] = list(c.tags)
        crit.append(d)
    agg = {k: v for k, v in dataclasses.asdict(rubric.aggregation).items() if v is not None}
    rec = {"id": rubric.id, "prompt": rubric.prompt, "criteria": crit, "aggregation": agg}
    if rubric.reference_answer is not None:
        rec["reference_answer"] = rubric.reference_answer
    return rec


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks [{"type": "text", "text": ...}, ...]
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type", "text") == "text")
    return "" if content is None else str(content)


def _prompt_for_record(prompt: Any) -> Any:
    if prompt is None or prompt == "" or prompt == []:
        # the rule judge never reads the prompt; an LLM judge should get the real one (see the docs)
        return "(prompt not given)"
    if isinstance(prompt, list):
        out = [{"role": m.get("role", "user"), "content": _content_text(m.get("content"))}
               for m in prompt if isinstance(m, dict)]
        out = [m for m in out if m["content"]]
        return out or "(prompt not given)"
    return str(prompt)


def response_text(completion: Any) -> str:
    """The text a judge grades: a string as is; for chat messages (TRL's conversational completions, tool
    turns included) the content of the last assistant message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, list):
        for m in reversed(completion):
            if isinstance(m, dict) and m.get("role", "assistant") == "assistant":
                return _content_text(m.get("content"))
        return ""
    raise TypeError(f"completion: expected a string or a list of chat messages, got {type(completion).__name__}")


class RubricCache:
    """Parsed rubrics by the JSON of their cell (a prompt's rubric repeats once per generation)."""

    def __init__(self, maxsize: int = 4096):
        self.maxsize = maxsize
        self._d: OrderedDict[str, Any] = OrderedDict()

    def get(self, value: Any, **kw):
        from rubric_fast.rubric import Rubric

        if isinstance(value, Rubric):
            return value
        try:
            key = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
            key = key + "\x00" + json.dumps(kw, sort_keys=True, default=str)
        except (TypeError, ValueError):
            return rubric_from_value(value, **kw)
        hit = self._d.get(key)
        if hit is not None:
            self._d.move_to_end(key)
            return hit
        r = rubric_from_value(value, **kw)
        self._d[key] = r
        if len(self._d) > self.maxsize:
            self._d.popitem(last=False)
        return r


def build_scorer_from(config: Any = None, judge: Any = None):
    """A :class:`~rubric_fast.scoring.StreamingScorer` from a scorer mapping (``{judge: {...}, deadline_s, ...}``,
    see :mod:`rubric_fast.scoring`), or around ``judge``; the default is the rule judge."""
    from rubric_fast.scoring import build_scorer

    if config is None:
        config = {"judge": {"type": "rule"}} if judge is None else {}
    return build_scorer(config, judge=judge)


class BackgroundScorer:
    """A scoring service for synchronous callers (a sync TRL reward function, verl's ``compute_score``): the
    trainer's own :class:`~rubric_fast.scoring.ScoringService` (its event-loop thread, guard, cache, audit).
    ``score_many`` blocks until every completion is scored or failed and returns the
    :class:`~rubric_fast.scoring.ScoredRollout` of each (a crash fails that item: reward None, never 0)."""

    def __init__(self, config: Any = None, *, judge: Any = None):
        from rubric_fast.scoring.config import build_service

        if config is None:
            config = {"judge": {"type": "rule"}} if judge is None else {}
        self.service = build_service(config, judge=judge)
        self.scorer = self.service.scorer

    def score_many(self, items: list[tuple[str, Any, str]], timeout: float | None = None) -> list:
        """``items``: (rollout_id, Rubric, response) -> ScoredRollout per item, in order."""
        if self.service._closed:
            raise RuntimeError("BackgroundScorer is closed")
        return self.service.score_now(items, timeout)

    def metrics(self) -> dict:
        return self.service.metrics()

    def close(self) -> None:
        self.service.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
