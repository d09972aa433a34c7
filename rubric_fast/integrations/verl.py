"""verl adapter: a rubric-backed ``compute_score`` for verl's custom reward function hook.

verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info)`` once per response (the
naive reward manager) and uses the float it returns, or ``result["score"]`` of a dict whose other keys go to
``reward_extra_info``. Point verl at this module::

    custom_reward_function.path=<site-packages>/rubric_fast/integrations/verl.py
    custom_reward_function.name=compute_score           # or compute_score_batch for the batch reward manager
    +custom_reward_function.reward_kwargs.scorer_config='{"judge": {"type": "http", ...}}'   # optional

Where the rubric comes from (first that is present):

1. ``extra_info["rubric"]``: a rubric_fast record (dict or JSON string), a list of criteria, or verl/HealthBench
   ``{criterion, points}`` items; then a plain-string ``ground_truth`` is the reference answer;
2. ``ground_truth`` itself as such a record / list (dict or JSON string), or a ``{rubrics: [...],
   ground_truth: ...}`` dict. :func:`verl_row` writes rows this way (the record as JSON in
   ``reward_model.ground_truth``, which survives parquet whatever the criteria look like).

The prompt the judge sees: the record's ``prompt``, else ``extra_info["prompt"]`` / ``["question"]`` (verl
does not pass the prompt to ``compute_score``; the rule judge does not need it, an LLM judge does).

The judge: the rule judge unless configured, by (first that is set) the ``scorer_config`` keyword (verl's
``custom_reward_function.reward_kwargs``), :func:`configure`, or the environment variable
``RUBRIC_FAST_VERL_SCORER`` holding the scorer mapping as JSON or the path of a JSON/YAML file with it (the
format of :mod:`rubric_fast.scoring`: ``{"judge": {...}, "deadline_s": ..., "cache_path": ...}``). One
scorer per process and configuration, on its own event-loop thread, with the verdict cache if configured.

A failed judgement is never a silent 0. verl has no "missing reward": its reward is a float tensor, so
``on_failure="raise"`` (the default) raises :class:`RubricJudgementFailed` with the judge's error, stopping
the step loudly; ``on_failure="nan"`` returns NaN instead (verl's actor then sees a non-finite loss / grad
norm for that batch and skips or reports it: use it only if you monitor for it). Set it with the
``on_failure`` keyword or ``RUBRIC_FAST_VERL_ON_FAILURE=raise|nan``.

``return_details=True`` (keyword or ``RUBRIC_FAST_VERL_DETAILS=1``) returns ``{"score", "rubric_failed",
"rubric_n_criteria", "rubric_n_met"}``: numbers with the same keys for every sample, which is what verl's
``reward_extra_info`` needs (per-criterion ids differ between rubrics, so they are not keys; the full
per-criterion verdicts are in :func:`score_details`).
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

from . import BackgroundScorer, RubricCache, rubric_from_value, rubric_to_record

__all__ = ["RubricJudgementFailed", "compute_score", "compute_score_async", "compute_score_batch", "configure",
           "score_details", "verl_row"]

ON_FAILURE = ("raise", "nan")
_ENV_SCORER = "RUBRIC_FAST_VERL_SCORER"
_ENV_ON_FAILURE = "RUBRIC_FAST_VERL_ON_FAILURE"
_ENV_DETAILS = "RUBRIC_FAST_VERL_DETAILS"


class RubricJudgementFailed(RuntimeError):
    """The judge could not grade a response (verl has no missing-reward value; see ``on_failure``)."""


_lock = threading.Lock()
_scorers: dict[tuple[int, str], BackgroundScorer] = {}
_configured: Any = None
_rubrics = RubricCache()
_calls = 0


def configure(scorer_config: Any = None) -> None:
    """Set the scorer mapping for this process (``None``: back to the environment / rule judge)."""
    global _configured
    _configured = scorer_config


def _load_config(value: Any) -> Any:
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{_ENV_SCORER} / scorer_config: not valid JSON ({exc})") from None
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"{_ENV_SCORER} / scorer_config: {text!r} is neither a JSON mapping nor a file")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(path.read_text())
    return json.loads(path.read_text())


def _scorer(scorer_config: Any = None) -> BackgroundScorer:
    cfg = _load_config(scorer_config if scorer_config is not None else
                       (_configured if _configured is not None else os.environ.get(_ENV_SCORER)))
    if cfg is None:
        cfg = {"judge": {"type": "rule"}}
    key = (os.getpid(), json.dumps(cfg, sort_keys=True, default=str))
    with _lock:
        bg = _scorers.get(key)
        if bg is None:  # per process: verl may fork reward workers
            bg = _scorers[key] = BackgroundScorer(cfg)
        return bg


def _option(value: Any, env: str, default: Any) -> Any:
    return value if value is not None else os.environ.get(env, default)


def _rubric(ground_truth: Any, extra_info: dict | None):
    extra = extra_info if isinstance(extra_info, dict) else {}
    prompt = extra.get("prompt") or extra.get("question")
    if extra.get("rubric") is not None:
        # a plain-string ground truth is the reference answer; a JSON one is not
        ref = (ground_truth if isinstance(ground_truth, str) and ground_truth.strip()
               and not ground_truth.lstrip().startswith(("{", "[")) else None)
        return _rubrics.get(extra["rubric"], prompt=prompt, reference_answer=ref, where="extra_info['rubric']")
    if isinstance(ground_truth, str) and not ground_truth.lstrip().startswith(("{", "[")):
        raise ValueError("compute_score: no rubric: put a rubric record (or a list of criteria) in "
                         "extra_info['rubric'], or the record as JSON in reward_model.ground_truth "
                         f"(got ground_truth={ground_truth!r:.80} and no extra_info['rubric']); see verl_row()")
    return _rubrics.get(ground_truth, prompt=prompt, where="ground_truth")


def _result(scored, on_failure: str, details: bool):
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure: must be one of {', '.join(ON_FAILURE)}; got {on_failure!r}")
    failed = scored.reward is None
    if failed and on_failure == "raise":
        raise RubricJudgementFailed(
            f"compute_score: the judgement of this response failed ({scored.error}); verl has no missing-reward "
            f"value, so this is raised rather than scored 0. Fix the judge, or set on_failure='nan' "
            f"({_ENV_ON_FAILURE}=nan) to return NaN instead.")
    score = math.nan if failed else float(scored.reward)
    if not details:
        return score
    met = sum(1 for v in scored.verdicts if v.score is not None and v.score >= 0.5)
    return {"score": score, "rubric_failed": float(failed), "rubric_n_criteria": float(len(scored.verdicts)),
            "rubric_n_met": float(met)}


def _truthy(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


def score_details(data_source: Any, solution_str: str, ground_truth: Any, extra_info: dict | None = None, *,
                  scorer_config: Any = None):
    """The full :class:`~rubric_fast.scoring.ScoredRollout` (reward or None, verdicts, per-criterion detail)."""
    global _calls
    rubric = _rubric(ground_truth, extra_info)
    _calls += 1
    return _scorer(scorer_config).score_many([(f"verl-{_calls}", rubric, solution_str)])[0]


def compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: dict | None = None, *,
                  scorer_config: Any = None, on_failure: str | None = None, return_details: bool | None = None,
                  **_: Any) -> float | dict:
    """verl custom reward function: the rubric reward of ``solution_str`` (float, or a dict with ``score``)."""
    scored = score_details(data_source, solution_str, ground_truth, extra_info, scorer_config=scorer_config)
    return _result(scored, _option(on_failure, _ENV_ON_FAILURE, "raise"),
                   _truthy(_option(return_details, _ENV_DETAILS, False)))


def compute_score_batch(data_sources: list, solution_strs: list[str], ground_truths: list, extra_infos: list | None = None,
                        *, scorer_config: Any = None, on_failure: str | None = None,
                        return_details: bool | None = None, **_: Any) -> list:
    """Batch form (verl's ``BatchRewardManager``): every response is judged concurrently."""
    global _calls
    n = len(solution_strs)
    extra_infos = extra_infos if extra_infos is not None else [None] * n
    if not len(data_sources) == len(ground_truths) == len(extra_infos) == n:
        raise ValueError(f"compute_score_batch: lengths differ (data_sources {len(data_sources)}, solution_strs {n}, "
                         f"ground_truths {len(ground_truths)}, extra_infos {len(extra_infos)})")
    items = []
    for i in range(n):
        _calls += 1
        items.append((f"verl-{_calls}", _rubric(ground_truths[i], extra_infos[i]), solution_strs[i]))
    scored = _scorer(scorer_config).score_many(items)
    mode = _option(on_failure, _ENV_ON_FAILURE, "raise")
    details = _truthy(_option(return_details, _ENV_DETAILS, False))
    return [_result(s, mode, details) for s in scored]


async def compute_score_async(data_source: Any, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                              *, scorer_config: Any = None, on_failure: str | None = None,
                              return_details: bool | None = None, **_: Any) -> float | dict:
    """``async`` form for reward loops that await their reward function: the judging runs on the scorer's own
    loop thread and this coroutine awaits it without blocking the caller's loop."""
    import asyncio

    return await asyncio.to_thread(compute_score, data_source, solution_str, ground_truth, extra_info,
                                   scorer_config=scorer_config, on_failure=on_failure, return_details=return_details)


def verl_row(rubric: Any, *, data_source: str = "rubric_fast", index: Any = None, ability: str = "rubric") -> dict:
    """A verl RL dataset row for a rubric (a Rubric, a rubric_fast record dict or JSON string): ``prompt`` (chat
    messages for verl's chat template), ``reward_model.ground_truth`` = the record as JSON (read back by
    :func:`compute_score`), ``extra_info`` with the index and the prompt text (for LLM judges)."""
    r = rubric_from_value(rubric)
    rec = rubric_to_record(r)
    return {"data_source": data_source, "prompt": r.prompt, "ability": ability,
            "reward_model": {"style": "rubric", "ground_truth": json.dumps(rec, ensure_ascii=False)},
            "extra_info": {"index": r.id if index is None else index, "prompt": r.prompt_text}}
