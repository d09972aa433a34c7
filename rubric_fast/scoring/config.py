"""Factories from plain config: :func:`build_judge`, :func:`build_scorer`, :func:`build_service`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rubric_fast.judges.guard import GuardConfig, GuardedJudge
from rubric_fast.judges.pairwise import ChatPairwiseJudge, RulePairwiseJudge
from rubric_fast.judges.routing import RoutingJudge
from rubric_fast.judges.rule import RuleJudge

from rubric_fast.settings import check_fields, setting

from .pool import CallPool
from .scorer import ScorerConfig, StreamingScorer
from .service import ScoringService

JUDGE_TYPES = ("rule", "http", "hf", "embedding")
_CHAT = ("http", "hf")


def _judge(default, help, *, judges: tuple[str, ...], **kw):
    """A judge key: ``judges`` are the judge types that take it; null = that judge's own default."""
    return setting(default, help, meta={"judges": judges}, **kw)


@dataclass
class JudgeConfig:
    """``judge``: who grades the criteria. ``rule`` criteria always go to the rule judge; ``llm`` criteria to
    an http judge (an OpenAI-compatible server: vLLM, SGLang, an API) or an hf judge (a local transformers
    model); ``type: embedding`` grades them by embedding similarity to the reference answer. A key left null
    takes the judge's own default (rubric_fast.judges)."""

    type: str = setting("rule", "the judge for llm criteria", choices=JUDGE_TYPES)
    guard: Any = setting(True, "the junk guard before the judge: true, false or a mapping of GuardConfig keys")
    model: str | None = _judge(None, "http: the served model name; hf: a Hugging Face id, local folder or "
                               "pkg:<package>", judges=_CHAT)
    endpoints: list[str] | None = _judge(None, "http: base URLs of OpenAI-compatible servers, e.g. "
                                         "[http://127.0.0.1:8000/v1]", judges=("http",))
    api_key_env: str | None = _judge(None, "http: the environment variable that holds the API key (never logged)",
                                     judges=("http",))
    mode: str | None = _judge(None, "per_criterion (one call per criterion), batch (criteria_per_call / "
                              "batch_size criteria per call) or holistic; default per_criterion", judges=_CHAT,
                              choices=(None, "per_criterion", "batch", "holistic"))
    batch_size: int | None = _judge(None, "http: criteria per call in batch mode (default 5); hf: sequences per "
                                    "generate (default 8)", judges=_CHAT, check=lambda v: v >= 1,
                                    accepts="an integer >= 1")
    criteria_per_call: int | None = _judge(None, "hf: criteria per call in batch mode (default 5)", judges=("hf",),
                                           check=lambda v: v >= 1, accepts="an integer >= 1")
    max_reasks: int | None = _judge(None, "re-asks after a reply out of format, before the judgement fails "
                                    "(default 2)", judges=_CHAT, check=lambda v: v >= 0, accepts="an integer >= 0")
    structured: bool | None = _judge(None, "send the reply's JSON schema (http: response_format; hf: constrained "
                                     "decoding); default false", judges=_CHAT)
    explanation_chars: int | None = _judge(None, "longest explanation in a structured reply (default 400)",
                                           judges=_CHAT, check=lambda v: v >= 1, accepts="an integer >= 1")
    max_tokens: int | None = _judge(None, "http: max_tokens of a reply (default 512)", judges=("http",),
                                    check=lambda v: v >= 1, accepts="an integer >= 1")
    temperature: float | None = _judge(None, "http: sampling temperature (default 0)", judges=("http",),
                                       check=lambda v: v >= 0, accepts="a number >= 0")
    extra_body: dict | None = _judge(None, "http: extra fields of every request body", judges=("http",))
    concurrency: int | None = _judge(None, "http: calls in flight (default 32)", judges=("http",),
                                     check=lambda v: v >= 1, accepts="an integer >= 1")
    rpm: float | None = _judge(None, "http: requests per minute at most; null = no limit", judges=("http",),
                               check=lambda v: v > 0, accepts="a number > 0")
    tpm: float | None = _judge(None, "http: tokens per minute at most; null = no limit", judges=("http",),
                               check=lambda v: v > 0, accepts="a number > 0")
    timeout_s: float | None = _judge(None, "seconds per call (http default 60, hf 600)", judges=_CHAT,
                                     check=lambda v: v > 0, accepts="a number > 0")
    retries: int | None = _judge(None, "http: retries of a failed call (default 4)", judges=("http",),
                                 check=lambda v: v >= 0, accepts="an integer >= 0")
    backoff_base_s: float | None = _judge(None, "http: first retry delay (default 0.5 s)", judges=("http",),
                                          check=lambda v: v >= 0, accepts="a number >= 0")
    backoff_max_s: float | None = _judge(None, "http: longest retry delay (default 30 s)", judges=("http",),
                                         check=lambda v: v >= 0, accepts="a number >= 0")
    max_new_tokens: int | None = _judge(None, "hf: tokens per reply (default 256)", judges=("hf",),
                                        check=lambda v: v >= 1, accepts="an integer >= 1")
    max_input_tokens: int | None = _judge(None, "hf: longest prompt (default 4096)", judges=("hf",),
                                          check=lambda v: v >= 1, accepts="an integer >= 1")
    device: str | None = _judge(None, "hf / embedding: the device (default cpu)", judges=("hf", "embedding"))
    dtype: str | None = _judge(None, "hf: model dtype; null = the checkpoint's", judges=("hf",),
                               choices=(None, "float32", "bfloat16", "float16"))
    batch_wait_s: float | None = _judge(None, "hf: wait this long to fill a generate batch (default 0.005)",
                                        judges=("hf",), check=lambda v: v >= 0, accepts="a number >= 0")
    gguf_file: str | None = _judge(None, "hf: a .gguf file in model (or auto), loaded dequantized", judges=("hf",))
    model_path: str | None = _judge(None, "embedding: the sentence-embedding model (default all-MiniLM-L6-v2)",
                                    judges=("embedding",))
    threshold: float | None = _judge(None, "embedding: similarity at which a criterion is met; null = a graded "
                                     "score between low and high", judges=("embedding",))
    low: float | None = _judge(None, "embedding: similarity scored 0 (default 0)", judges=("embedding",))
    high: float | None = _judge(None, "embedding: similarity scored 1 (default 1)", judges=("embedding",))
    max_length: int | None = _judge(None, "embedding: tokens per text (default 256)", judges=("embedding",),
                                    check=lambda v: v >= 1, accepts="an integer >= 1")

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "judge") -> JudgeConfig:
        """From a plain mapping; unknown keys and keys another judge type takes are refused by name."""
        if not isinstance(config, dict):
            raise ValueError(f"{where}: expected a mapping such as {{type: rule}}, got {type(config).__name__}")
        kind = config.get("type", "rule")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            ok = sorted(judge_keys(kind)) if kind in JUDGE_TYPES else sorted(known)
            raise ValueError(f"{where} ({kind}): unknown key(s) {unknown}; accepted: {ok}")
        if isinstance(config.get("endpoints"), str):  # one URL
            config = {**config, "endpoints": [config["endpoints"]]}
        out = cls(**config)
        out.check(where)
        return out

    def check(self, where: str = "judge") -> None:
        """The declared checks, then: every key set belongs to this judge type."""
        check_fields(self, where + ".")
        taken = judge_keys(self.type)
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None and f.name not in taken:
                users = ", ".join(f.metadata.get("judges", ()))
                raise ValueError(f"{where}.{f.name}: not a key of the {self.type} judge (it is for: {users}); "
                                 f"accepted with type {self.type}: {', '.join(sorted(taken))}")
        if self.type == "http":
            for key in ("model", "endpoints"):
                if not getattr(self, key):
                    raise ValueError(f"{where}.{key}: required for an http judge (e.g. model: Qwen/Qwen3-8B, "
                                     "endpoints: [http://localhost:8000/v1])")
            bad = [e for e in self.endpoints if not isinstance(e, str) or not e.startswith(("http://", "https://"))]
            if bad:
                raise ValueError(f"{where}.endpoints: {bad[0]!r} is not an http:// or https:// base URL")
        if self.type == "hf" and not self.model:
            raise ValueError(f"{where}.model: required for an hf judge (a Hugging Face name, a local path or "
                             "pkg:<package>)")

    def switch_type(self, kind: str) -> None:
        """A new judge type starts from its own defaults: every judge-specific key set for the previous type is
        cleared (the config layers: a file's hf judge, then ``judge={type: http, ...}`` on the command line)."""
        if kind == self.type:
            return
        for f in dataclasses.fields(self):
            if "judges" in f.metadata:
                setattr(self, f.name, None)
        self.type = kind

    def judge_kwargs(self) -> dict[str, Any]:
        """The keys set for this judge type, as its constructor's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if "judges" in f.metadata and getattr(self, f.name) is not None}

    def to_dict(self) -> dict[str, Any]:
        """The keys that are set (plain data: what a run logs and what build_judge also accepts)."""
        return {"type": self.type, "guard": self.guard, **self.judge_kwargs()}


def judge_keys(kind: str) -> set[str]:
    """The keys a judge of type ``kind`` takes (with ``type`` and ``guard``)."""
    return {f.name for f in dataclasses.fields(JudgeConfig)
            if "judges" not in f.metadata or kind in f.metadata["judges"]}


def effective_guard(scoring_guard: Any, judge: JudgeConfig | dict | None) -> Any:
    """The junk guard in force: ``scoring.guard`` when it says more than the default (true), else the judge
    section's ``guard``."""
    if scoring_guard is not None and scoring_guard is not True:
        return scoring_guard
    return as_judge_config(judge or {"type": "rule"}).guard


def as_judge_config(config: Any, where: str = "judge") -> JudgeConfig:
    """A JudgeConfig from a JudgeConfig (checked again) or a plain mapping."""
    if isinstance(config, JudgeConfig):
        config.check(where)
        return config
    return JudgeConfig.from_dict(config, where)


# the criterion verifiers each judge type grades (see build_judge's routing)
VERIFIERS_BY_JUDGE = {"rule": ("rule",), "http": ("llm", "rule"), "hf": ("llm", "rule"),
                      "embedding": ("llm", "embedding", "rule")}


def check_judge_coverage(rubrics, judge_cfg: JudgeConfig | dict[str, Any]) -> None:
    """Refuse a dataset holding a criterion that the configured judge cannot grade (it would fail every
    rollout of its prompt, forever): one line naming the file, line, criterion and the judge types that can."""
    kind = judge_cfg.type if isinstance(judge_cfg, JudgeConfig) else (judge_cfg or {}).get("type")
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


def build_judge(config: JudgeConfig | dict[str, Any], *, guard: bool | None = None):
    """A judge from a :class:`JudgeConfig` or a plain mapping of its keys.

    Criteria are routed by their ``verifier``: ``rule`` criteria always go to a :class:`RuleJudge`; ``llm``
    criteria to the configured http/hf judge (or to the embedding judge when ``type: embedding``);
    ``embedding`` criteria to an embedding judge when one is configured. ``guard`` (default: the config's
    ``guard`` key, else on) wraps the result in :class:`GuardedJudge`; the scorer applies its own guard,
    so :func:`build_scorer` builds the judge with ``guard=False``.
    """
    jc = as_judge_config(config)
    kind = jc.type
    kw = jc.judge_kwargs()
    rule = RuleJudge()
    if kind == "rule":
        judge: Any = RoutingJudge({"rule": rule}, name="rule")
    elif kind == "http":
        from rubric_fast.judges.http import HttpJudge

        judge = RoutingJudge({"llm": HttpJudge(**kw), "rule": rule})
    elif kind == "hf":
        from rubric_fast.judges.hf import HFJudge

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
    use_guard = jc.guard if guard is None else guard
    gcfg = GuardConfig.from_value(use_guard)
    return GuardedJudge(judge, gcfg) if gcfg.enabled else judge


def scorer_config(config: Any) -> tuple[JudgeConfig | dict[str, Any] | None, ScorerConfig]:
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
    if isinstance(scoring, ScorerConfig):
        scoring = dataclasses.asdict(scoring)
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
        jc = as_judge_config(judge_cfg)
        judge = build_judge(jc, guard=False)
        cfg.guard = effective_guard(cfg.guard, jc)
    return judge, cfg


def build_scorer(config: Any, *, judge=None, cache=None) -> StreamingScorer:
    """Async scorer from ``{judge: {...}, min_valid: ..., ...}``; pass ``judge=`` to use your own judge."""
    judge, cfg = _judge_and_config(config, judge)
    return StreamingScorer(judge, cfg, cache=cache)


def build_service(config: Any, *, judge=None, cache=None) -> ScoringService:
    """Synchronous :class:`ScoringService` (background event loop) from the same config as build_scorer."""
    judge, cfg = _judge_and_config(config, judge)
    return ScoringService(judge, cfg, cache=cache)


__all__ = ["JUDGE_TYPES", "JudgeConfig", "as_judge_config", "judge_keys", "VERIFIERS_BY_JUDGE", "CallPool", "build_judge", "check_judge_coverage", "build_scorer", "build_service", "scorer_config"]


def build_pairwise_judge(judge_cfg: JudgeConfig | dict):
    """From the trainer's ``judge`` mapping: ``rule`` -> RulePairwiseJudge, ``http`` / ``hf`` -> the chat judge
    behind ChatPairwiseJudge. ValueError (naming the key) for a judge type without a pairwise mode."""
    kind = as_judge_config(judge_cfg).type
    if kind == "rule":
        return RulePairwiseJudge()
    if kind in ("http", "hf"):
        routed = build_judge(judge_cfg, guard=False)
        return ChatPairwiseJudge(routed.judges["llm"])
    raise ValueError(f"judge.type: pairwise judging (reward.pairwise.enabled) works with the rule, http and hf "
                     f"judges; got {kind!r}")
