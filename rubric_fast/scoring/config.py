"""Factories from plain config: :func:`build_judge`, :func:`build_scorer`, :func:`build_service`."""

from __future__ import annotations

import dataclasses
from typing import Any

from rubric_fast.judges.guard import GuardConfig, GuardedJudge
from rubric_fast.judges.pairwise import ChatPairwiseJudge, RulePairwiseJudge
from rubric_fast.judges.routing import RoutingJudge
from rubric_fast.judges.rule import RuleJudge

from .pool import CallPool
from .scorer import ScorerConfig, StreamingScorer
from .service import ScoringService

JUDGE_TYPES = ("rule", "http", "hf", "embedding")
_POOL_KEYS = {"concurrency", "rpm", "tpm", "timeout_s", "retries", "backoff_base_s", "backoff_max_s"}
_JUDGE_KEYS = {
    "rule": set(),
    "http": {"model", "endpoints", "api_key_env", "mode", "batch_size", "max_reasks", "max_tokens", "temperature",
             "extra_body", "structured", "explanation_chars"} | _POOL_KEYS,
    "hf": {"model", "mode", "batch_size", "criteria_per_call", "max_new_tokens", "max_input_tokens", "device",
           "dtype", "batch_wait_s", "timeout_s", "max_reasks", "structured", "gguf_file", "explanation_chars"},
    "embedding": {"model_path", "threshold", "low", "high", "device", "max_length"},
}
_COMMON_KEYS = {"type", "guard"}
# the criterion verifiers each judge type grades (see build_judge's routing)
VERIFIERS_BY_JUDGE = {"rule": ("rule",), "http": ("llm", "rule"), "hf": ("llm", "rule"),
                      "embedding": ("llm", "embedding", "rule")}


def check_judge_coverage(rubrics, judge_cfg: dict[str, Any]) -> None:
    """Refuse a dataset holding a criterion that the configured judge cannot grade (it would fail every
    rollout of its prompt, forever): one line naming the file, line, criterion and the judge types that can."""
    kind = (judge_cfg or {}).get("type", (judge_cfg or {}).get("kind"))
    if kind not in VERIFIERS_BY_JUDGE:
        return  # build_judge names the bad type
    graded = VERIFIERS_BY_JUDGE[kind]
    for r in rubrics:
        for i, c in enumerate(r.criteria):
            if c.verifier in graded:
                continue
            can = [k for k, v in VERIFIERS_BY_JUDGE.items() if c.verifier in v]
            where = r.location or f"rubric {r.id!r}"
            raise ValueError(f"{where}: key 'criteria[{i}].verifier': criterion {c.id!r} needs a judge for verifier "
                             f"{c.verifier!r}, but judge.type is {kind!r} (it grades: {', '.join(graded)}); set "
                             f"judge.type to {' or '.join(can)}, or give the criterion a rule verifier")


def _check_keys(cfg: dict, allowed: set, where: str) -> None:
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; accepted: {sorted(allowed)}")


def build_judge(config: dict[str, Any], *, guard: bool | None = None):
    """A judge from a plain mapping (see :mod:`rubric_fast.scoring` for the keys).

    Criteria are routed by their ``verifier``: ``rule`` criteria always go to a :class:`RuleJudge`; ``llm``
    criteria to the configured http/hf judge (or to the embedding judge when ``type: embedding``);
    ``embedding`` criteria to an embedding judge when one is configured. ``guard`` (default: the config's
    ``guard`` key, else on) wraps the result in :class:`GuardedJudge`; the scorer applies its own guard,
    so :func:`build_scorer` builds the judge with ``guard=False``.
    """
    if not isinstance(config, dict):
        raise ValueError(f"judge config must be a mapping, got {type(config).__name__}")
    kind = config.get("type")
    if kind not in JUDGE_TYPES:
        raise ValueError(f"judge.type: must be one of {', '.join(JUDGE_TYPES)}; got {kind!r}")
    _check_keys(config, _JUDGE_KEYS[kind] | _COMMON_KEYS, f"judge ({kind})")
    kw = {k: v for k, v in config.items() if k not in _COMMON_KEYS}
    rule = RuleJudge()
    if kind == "rule":
        judge: Any = RoutingJudge({"rule": rule}, name="rule")
    elif kind == "http":
        from rubric_fast.judges.http import HttpJudge

        for key in ("model", "endpoints"):
            if not kw.get(key):
                raise ValueError(f"judge.{key}: required for an http judge (e.g. model: Qwen/Qwen3-8B, "
                                 "endpoints: [http://localhost:8000/v1])")
        judge = RoutingJudge({"llm": HttpJudge(**kw), "rule": rule})
    elif kind == "hf":
        from rubric_fast.judges.hf import HFJudge

        if not kw.get("model"):
            raise ValueError("judge.model: required for an hf judge (a Hugging Face name or a local path)")
        if isinstance(kw["model"], str):  # a missing package or GGUF file: one line now, not a failed call later
            from rubric_fast.gguf import resolve_gguf_file, resolve_model_path

            folder = resolve_model_path(kw["model"], key="judge.model")
            if kw.get("gguf_file"):
                resolve_gguf_file(folder, kw["gguf_file"], key="judge.gguf_file")
        if "timeout_s" in kw:
            kw["call_timeout_s"] = kw.pop("timeout_s")
        judge = RoutingJudge({"llm": HFJudge(**kw), "rule": rule})
    else:
        from rubric_fast.judges.embedding import EmbeddingJudge

        emb = EmbeddingJudge(**kw)
        judge = RoutingJudge({"llm": emb, "embedding": emb, "rule": rule})
    use_guard = config.get("guard", True) if guard is None else guard
    gcfg = GuardConfig.from_value(use_guard)
    return GuardedJudge(judge, gcfg) if gcfg.enabled else judge


def scorer_config(config: Any) -> tuple[dict[str, Any] | None, ScorerConfig]:
    """Split ``{judge: {...}, scoring-keys...}`` (or a ScorerConfig) into (judge mapping, ScorerConfig)."""
    if isinstance(config, ScorerConfig):
        return None, config
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    if not isinstance(config, dict):
        raise ValueError(f"scorer config must be a mapping or ScorerConfig, got {type(config).__name__}")
    config = dict(config)
    judge_cfg = config.pop("judge", None)
    scoring = config.pop("scoring", None) or {}
    merged = {**scoring, **config}
    fields = {f.name for f in dataclasses.fields(ScorerConfig)}
    _check_keys(merged, fields, "scoring")
    cfg = ScorerConfig(**merged)
    cfg.validate()
    return judge_cfg, cfg


def _judge_and_config(config: Any, judge):
    """The scorer config and the judge (built from the config's ``judge`` mapping unless one is given)."""
    judge_cfg, cfg = scorer_config(config)
    if judge is None:
        if judge_cfg is None:
            raise ValueError("scorer config: missing 'judge' mapping (e.g. {type: rule})")
        judge = build_judge(judge_cfg, guard=False)
        if "guard" in judge_cfg and cfg.guard is True:
            cfg.guard = judge_cfg["guard"]
    return judge, cfg


def build_scorer(config: Any, *, judge=None, cache=None) -> StreamingScorer:
    """Async scorer from ``{judge: {...}, min_valid: ..., ...}``; pass ``judge=`` to use your own judge."""
    judge, cfg = _judge_and_config(config, judge)
    return StreamingScorer(judge, cfg, cache=cache)


def build_service(config: Any, *, judge=None, cache=None) -> ScoringService:
    """Synchronous :class:`ScoringService` (background event loop) from the same config as build_scorer."""
    judge, cfg = _judge_and_config(config, judge)
    return ScoringService(judge, cfg, cache=cache)


__all__ = ["JUDGE_TYPES", "VERIFIERS_BY_JUDGE", "CallPool", "build_judge", "check_judge_coverage", "build_scorer", "build_service", "scorer_config"]


def build_pairwise_judge(judge_cfg: dict):
    """From the trainer's ``judge`` mapping: ``rule`` -> RulePairwiseJudge, ``http`` / ``hf`` -> the chat judge
    behind ChatPairwiseJudge. ValueError (naming the key) for a judge type without a pairwise mode."""
    kind = (judge_cfg or {}).get("type")
    if kind == "rule":
        return RulePairwiseJudge()
    if kind in ("http", "hf"):
        routed = build_judge(judge_cfg, guard=False)
        return ChatPairwiseJudge(routed.judges["llm"])
    raise ValueError(f"judge.type: pairwise judging (reward.pairwise.enabled) works with the rule, http and hf "
                     f"judges; got {kind!r}")
