"""Held-out evaluation: G responses per prompt of a rubric split, scored by the judge.

    rubric-fast eval MODEL --rubrics R [--split held_out] [--config CFG.yaml] [-G 4] [--out eval.json]

MODEL is a base model (a hub id, a folder, ``pkg:<package>`` with ``--gguf-file``), an exported folder
(``rubric-fast export`` / ``import``), or a run directory (its newest checkpoint, or ``--step N``; the judge,
scoring and sampling settings then default to the run's own config.yaml). The numbers:

* ``mean_reward``: the mean reward of every response that got one, the guard's junk included (it scores at
  most 0: a policy that answers with filler is worse, not unmeasured);
* per criterion: met / judged, and failed judgements apart;
* failed responses (the judge gave no usable verdict after its retries): counted, never scored as 0, and
  left out of the mean;
* the judge audit (``scoring.audit_rate`` canaries, rubric_fast.scoring.audit): the false-pass rate on
  content-free answers and the false-fail rate on reference answers.

Sampling uses its own seed (``--seed`` / ``eval.seed``) in a forked RNG, so the same prompts get the same random
stream before and after training and the training's RNG is never touched.

In a training run, ``eval.every: N`` evaluates at the start (step 0), every N steps and at the end, through
the run's own judge (``eval/reward``, ``eval/pass_rate/<criterion>``, ``eval/failed`` ... in metrics.jsonl;
plotted by ``rubric-fast report``). Prompts are split over the ranks and the counts summed.

The split of a prompt is ``meta.split`` of its record (rubric_fast jsonl), e.g. ``train`` / ``held_out``;
``data.split`` restricts training to one split in the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rubric_fast.settings import check_fields, setting

ALL = "all"


@dataclass
class EvalConfig:
    """``eval``: held-out evaluation during training (rubric_fast/trainer/evaluate.py)."""

    every: int = setting(0, "evaluate at the start, every N steps and at the end; 0 = off",
                         check=lambda v: v >= 0, accepts="an integer >= 0 (0 = off)")
    path: str | None = setting(None, "the rubric dataset evaluated; null = data.path")
    split: str | None = setting("held_out", "meta.split of the prompts evaluated; null or all = every prompt")
    num_generations: int = setting(4, "G responses per prompt", check=lambda v: v >= 1, accepts="an integer >= 1")
    max_prompts: int = setting(0, "the first N prompts of the split; 0 = all", check=lambda v: v >= 0,
                               accepts="an integer >= 0 (0 = all)")
    temperature: float | None = setting(None, "sampling temperature; null = rollout.temperature",
                                         check=lambda v: v > 0, accepts="a number > 0 or null")
    max_new_tokens: int | None = setting(None, "longest response; null = rollout.max_new_tokens",
                                          check=lambda v: v >= 1, accepts="an integer >= 1 or null")
    seed: int = setting(1234, "sampling seed: the same random stream at every evaluation")


def check_config(ec: EvalConfig) -> None:
    """ValueError naming the key (the declared checks of the fields)."""
    check_fields(ec, "eval.")


def split_of(rubric) -> str | None:
    meta = rubric.source.get("meta") if isinstance(rubric.source, dict) else None
    return meta.get("split") if isinstance(meta, dict) else None


def select_split(rubrics: list, split: str | None, *, key: str, path: str = "") -> list:
    """The prompts whose ``meta.split`` is ``split`` (all for None / ``all``); ValueError naming ``key`` when
    none is."""
    if split is None or split == ALL:
        return list(rubrics)
    out = [r for r in rubrics if split_of(r) == split]
    if not out:
        have = sorted({str(s) for s in map(split_of, rubrics) if s is not None})
        raise ValueError(f"{key}: no prompt of {path or 'the dataset'} has meta.split {split!r} (splits there: "
                         f"{', '.join(have) or 'none'}; use {ALL} for every prompt)")
    return out


# ------------------------------------------------------------------------------------------------ one evaluation
@dataclass
class EvalResult:
    prompts: int = 0
    responses: int = 0
    scored: int = 0                     # got a reward (judged or guarded)
    guarded: int = 0                    # judged junk by the guard (reward <= 0), included in scored
    failed: int = 0                     # no usable judgement: counted apart, not in the mean
    reward_sum: float = 0.0
    reward_sq_sum: float = 0.0
    criteria: dict[str, list[float]] = field(default_factory=dict)   # id -> [met, judged, failed]
    tokens: int = 0
    truncated: int = 0
    generate_s: float = 0.0
    score_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.scored if self.scored else float("nan")

    @property
    def reward_stderr(self) -> float:
        n = self.scored
        if n < 2:
            return float("nan")
        var = max(0.0, (self.reward_sq_sum - self.reward_sum ** 2 / n) / (n - 1))
        return math.sqrt(var / n)

    def pass_rates(self) -> dict[str, float]:
        return {cid: met / judged for cid, (met, judged, _) in sorted(self.criteria.items()) if judged}

    def to_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        m = {f"{prefix}reward": self.mean_reward, f"{prefix}reward_stderr": self.reward_stderr,
             f"{prefix}responses": float(self.responses), f"{prefix}scored": float(self.scored),
             f"{prefix}guarded": float(self.guarded), f"{prefix}failed": float(self.failed),
             f"{prefix}completion_len": self.tokens / self.responses if self.responses else float("nan"),
             f"{prefix}truncated_frac": self.truncated / self.responses if self.responses else float("nan"),
             f"{prefix}time": self.generate_s + self.score_s}
        m.update({f"{prefix}pass_rate/{cid}": r for cid, r in self.pass_rates().items()})
        return m

    def as_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "responses": self.responses, "scored": self.scored, "guarded": self.guarded,
                "failed": self.failed, "mean_reward": None if not self.scored else self.mean_reward,
                "reward_stderr": None if self.scored < 2 else self.reward_stderr,
                "criteria": {cid: {"met": int(m), "judged": int(j), "failed": int(f),
                                   "pass_rate": m / j if j else None}
                             for cid, (m, j, f) in sorted(self.criteria.items())},
                "completion_tokens": self.tokens, "truncated": self.truncated,
                "generate_s": round(self.generate_s, 3), "score_s": round(self.score_s, 3),
                "generate_tokens_per_s": self.tokens / self.generate_s if self.generate_s > 0 else None}

    # the counts as one flat vector, for summing over ranks
    def vector(self, criteria_ids: list[str]) -> list[float]:
        v = [self.prompts, self.responses, self.scored, self.guarded, self.failed, self.reward_sum,
             self.reward_sq_sum, self.tokens, self.truncated]
        for cid in criteria_ids:
            v += self.criteria.get(cid, [0.0, 0.0, 0.0])
        return [float(x) for x in v]

    @classmethod
    def from_vector(cls, v: list[float], criteria_ids: list[str], generate_s: float, score_s: float) -> EvalResult:
        r = cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), v[5], v[6], {}, int(v[7]), int(v[8]),
                generate_s, score_s)
        for i, cid in enumerate(criteria_ids):
            met, judged, failed = v[9 + 3 * i: 12 + 3 * i]
            if judged or failed:
                r.criteria[cid] = [met, judged, failed]
        return r


def evaluate(engine, tokenizer, scorer, rubrics: list, *, num_generations: int, tag: str = "eval",
             samples: list | None = None) -> EvalResult:
    """Generate ``num_generations`` responses per rubric with ``engine`` and score them with ``scorer``
    (a :class:`~rubric_fast.trainer.rewards.ServiceScorer`). ``samples``: a list to append one row per response."""
    from .rollouts import encode_prompt  # late: config.py imports this module, rollouts.py imports config

    res = EvalResult(prompts=len(rubrics))
    prompts = [encode_prompt(tokenizer, r.prompt) for r in rubrics for _ in range(num_generations)]
    owners = [r for r in rubrics for _ in range(num_generations)]
    t0 = time.perf_counter()
    completions = [c for batch in engine.generate(prompts) for c in batch] if prompts else []
    res.generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    items = [(f"{tag}:{i // num_generations}:{i % num_generations}", r, c.text)
             for i, (r, c) in enumerate(zip(owners, completions))]
    scored = scorer.score_now(items) if items else []
    res.score_s = time.perf_counter() - t0
    for r, c, s in zip(owners, completions, scored):
        res.responses += 1
        res.tokens += len(c.token_ids)
        res.truncated += not c.finished
        if s.reward is None:
            res.failed += 1
            res.errors.extend(sorted({v.error for v in s.verdicts if v.error}) or [s.error or "unknown error"])
        else:
            res.scored += 1
            res.guarded += s.guard_reason is not None
            res.reward_sum += s.reward
            res.reward_sq_sum += s.reward * s.reward
        ids = {c_.id for c_ in r.criteria}
        for v in s.verdicts:
            if v.criterion_id not in ids:  # the guard's holistic verdict
                continue
            row = res.criteria.setdefault(v.criterion_id, [0.0, 0.0, 0.0])
            if v.score is None:
                row[2] += 1
            else:
                row[0] += v.score >= 0.5
                row[1] += 1
        if samples is not None:
            samples.append({"rubric_id": r.id, "prompt": r.prompt, "response": c.text, "reward": s.reward,
                            "guard_reason": s.guard_reason, "error": s.error,
                            "verdicts": [{"criterion_id": v.criterion_id, "score": v.score, "reason": v.reason,
                                          "error": v.error} for v in s.verdicts]})
    return res


def eval_rollout_config(rollout_cfg, ec: EvalConfig | None = None, *, temperature: float | None = None,
                        max_new_tokens: int | None = None):
    """The rollout settings of an evaluation: the training's, with the eval's temperature and length."""
    import dataclasses

    t = temperature if temperature is not None else (ec.temperature if ec and ec.temperature else None)
    n = max_new_tokens if max_new_tokens is not None else (ec.max_new_tokens if ec and ec.max_new_tokens else None)
    return dataclasses.replace(rollout_cfg, temperature=t or rollout_cfg.temperature,
                               max_new_tokens=n or rollout_cfg.max_new_tokens)


def seeded(seed: int, device):
    """A forked RNG seeded with ``seed``: sampling inside is reproducible, and the caller's RNG is unchanged."""
    import torch

    devices = [device] if getattr(device, "type", str(device)) == "cuda" else []
    ctx = torch.random.fork_rng(devices=devices)

    class _Seeded:
        def __enter__(self):
            ctx.__enter__()
            torch.manual_seed(seed)
            return self

        def __exit__(self, *exc):
            return ctx.__exit__(*exc)

    return _Seeded()


# ------------------------------------------------------------------------------------------------ in training
class TrainEvaluator:
    """``eval.every``: evaluations at the start, every N steps and at the end of a training run."""

    def __init__(self, cfg, *, policy, tokenizer, scorer, device, rank: int, world_size: int):
        from rubric_fast.rubric import load_rubrics

        from .config import ConfigError
        from .rollout import make_engine

        ec = cfg.eval
        self.cfg, self.ec, self.scorer, self.tokenizer, self.device = cfg, ec, scorer, tokenizer, device
        path = ec.path or cfg.data.path
        key = "eval.path" if ec.path else "data.path"
        try:
            rubrics = select_split(load_rubrics(path, cfg.data.format), ec.split, key="eval.split", path=path)
        except FileNotFoundError:
            raise ConfigError(f"{key}: no such file: {path}") from None
        except ValueError as exc:  # RubricError or the split
            raise ConfigError(str(exc) if str(exc).startswith("eval.") else f"{key}: {exc}") from None
        if ec.max_prompts:
            rubrics = rubrics[:ec.max_prompts]
        if len(rubrics) < world_size:
            raise ConfigError(f"eval.max_prompts: {len(rubrics)} evaluation prompts for {world_size} ranks")
        self.criteria_ids = sorted({c.id for r in rubrics for c in r.criteria})
        self.rubrics = rubrics[rank::world_size]
        self.world_size = world_size
        self.engine = make_engine("hf", policy, tokenizer, eval_rollout_config(cfg.rollout, ec))
        self.runs = 0

    def due(self, step: int) -> bool:
        return step == 0 or step % self.ec.every == 0 or step == self.cfg.max_steps

    def run(self, step: int) -> tuple[dict[str, float], EvalResult]:
        with seeded(self.ec.seed, self.device):
            res = evaluate(self.engine, self.tokenizer, self.scorer, self.rubrics,
                           num_generations=self.ec.num_generations, tag=f"eval{step}")
        if self.world_size > 1:
            import torch
            import torch.distributed as dist

            t = torch.tensor(res.vector(self.criteria_ids), dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            res = EvalResult.from_vector(t.tolist(), self.criteria_ids, res.generate_s, res.score_s)
        self.runs += 1
        return res.to_metrics(), res


def eval_line(step: int, res: EvalResult) -> str:
    rates = res.pass_rates()
    crit = ", ".join(f"{k} {v:.2f}" for k, v in rates.items())
    return (f"eval at step {step}: reward {res.mean_reward:.3f} +- {res.reward_stderr:.3f} over {res.scored} responses "
            f"({res.prompts} prompts; {res.guarded} guarded, {res.failed} failed); pass rates: {crit}")


# ------------------------------------------------------------------------------------------------ command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a run directory, an exported / imported folder, a hub id, or "
                                                  "pkg:<package> (with --gguf-file)")
    p.add_argument("--rubrics", help="rubric dataset (default: --config's eval.path or data.path)")
    p.add_argument("--split", default=None, help="meta.split of the prompts to evaluate (default: --config's "
                                                 "eval.split, else held_out; 'all' for every prompt)")
    p.add_argument("--config", help="a training config YAML: judge, scoring, rollout, model and eval settings "
                                    "(default: the run's config.yaml for a run directory)")
    p.add_argument("--gguf-file", help="MODEL's GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf, or auto)")
    p.add_argument("--step", type=int, help="a run directory's checkpoint step (default: the newest)")
    p.add_argument("-G", "--num-generations", type=int, help="responses per prompt (default: eval.num_generations)")
    p.add_argument("--max-prompts", type=int, help="evaluate only the first N prompts of the split")
    p.add_argument("--max-new-tokens", type=int, help="default: eval.max_new_tokens, else rollout.max_new_tokens")
    p.add_argument("--temperature", type=float, help="default: eval.temperature, else rollout.temperature")
    p.add_argument("--seed", type=int, help="sampling seed (default: eval.seed)")
    p.add_argument("--judge", help="rule | http | hf | embedding | a YAML/JSON file (default: the config's judge)")
    p.add_argument("--judge-model", help="judge model (http: served name; hf: name, path or pkg:<package>)")
    p.add_argument("--endpoint", action="append", default=[], help="judge base URL (repeatable)")
    p.add_argument("--audit-rate", type=float, help="judge-audit canaries per scored response (default: the "
                                                   "config's scoring.audit_rate)")
    p.add_argument("--cache", help="SQLite verdict cache file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--cpu-threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    p.add_argument("--out", help="write the summary (JSON) here")
    p.add_argument("--samples", help="write one row per response (JSONL) here")


class EvalError(ValueError):
    """Bad input; the message names the argument or key."""


def _run_dir_of(model: str) -> Path | None:
    """MODEL as a run directory (or one of its checkpoints), else None (a model folder or name)."""
    from .checkpoint import MANIFEST

    p = Path(model)
    if p.is_dir() and ((p / "config.yaml").is_file() or (p / MANIFEST).is_file() or (p / "checkpoints").is_dir()):
        return p
    return None


def _load(args, cfg):
    """(policy, tokenizer, description, run config or None)."""
    import dataclasses

    import torch

    from .config import ConfigError, ModelConfig
    from .models import load_policy, load_tokenizer

    run_dir = _run_dir_of(args.model)
    if run_dir is not None:
        from .export import ExportError, find_checkpoint, load_checkpoint_policy

        try:
            ckpt = find_checkpoint(run_dir, args.step)
            policy, tokenizer, _, _ = load_checkpoint_policy(ckpt, run_dir if ckpt != run_dir else None)
        except ExportError as exc:
            raise EvalError(f"MODEL: {exc}") from None
        return policy, tokenizer, f"{ckpt}", ckpt
    mc = dataclasses.replace(cfg.model) if cfg is not None else ModelConfig()
    mc.name_or_path = args.model
    mc.gguf_file = args.gguf_file if args.gguf_file else (cfg.model.gguf_file if cfg is not None and
                                                          cfg.model.name_or_path == args.model else None)
    mc.lora = type(mc.lora)()  # a base model: no adapters
    try:
        tokenizer = load_tokenizer(mc)
        policy = load_policy(mc, tokenizer, torch.device("cpu"))
    except ConfigError as exc:
        raise EvalError(str(exc).replace("model.name_or_path", "MODEL").replace("model.gguf_file", "--gguf-file")) \
            from None
    except OSError as exc:
        raise EvalError(f"MODEL: cannot load {args.model!r}: {str(exc).splitlines()[0]}") from None
    return policy.eval(), tokenizer, args.model + (f" ({mc.gguf_file})" if mc.gguf_file else ""), None


def _config(args):
    from .config import ConfigError, load_config

    path = args.config
    run_dir = _run_dir_of(args.model)
    if path is None and run_dir is not None and (run_dir / "config.yaml").is_file():
        path = run_dir / "config.yaml"
    if path is None:
        return None
    try:
        return load_config(path)
    except (ConfigError, FileNotFoundError) as exc:
        raise EvalError(f"--config: {exc}") from None


def _judge_settings(args, cfg) -> tuple[dict, dict]:
    from rubric_fast.scoring.command import _judge_config

    if args.judge is not None:
        ns = argparse.Namespace(judge=args.judge, model=args.judge_model, endpoint=args.endpoint, api_key_env=None,
                                mode=None, concurrency=None)
        try:
            judge, scoring = _judge_config(ns)
        except ValueError as exc:
            raise EvalError(str(exc)) from None
        if cfg is not None:
            scoring = {**dataclasses.asdict(cfg.scoring), **scoring}
    else:
        judge = cfg.judge.to_dict() if cfg is not None else {"type": "rule"}
        scoring = dataclasses.asdict(cfg.scoring) if cfg is not None else {}
        if args.judge_model:
            judge["model"] = args.judge_model
        if args.endpoint:
            judge["endpoints"] = args.endpoint
    scoring.pop("cache_path", None)
    if args.cache:
        scoring["cache_path"] = args.cache
    if args.audit_rate is not None:
        scoring["audit_rate"] = args.audit_rate
    # an evaluation never stops on the judge's error rate: failures are what it counts
    scoring.update(max_error_rate=1.0, min_valid=0)
    return judge, scoring


def _wait_for_canaries(service, timeout: float = 600.0) -> None:
    """The audit's canaries run in the background; the report waits for the ones already sent."""
    import asyncio

    asyncio.run_coroutine_threadsafe(service.scorer.audit.drain(), service._loop).result(timeout)


def _print_report(res, metrics: dict, rubrics, *, described: str, split, path, G: int, rollout, seed: int,
                  wall: float) -> tuple[float | None, float | None]:
    """The evaluation's table on stdout; returns the audit's (false-pass, false-fail) rates."""
    texts: dict[str, str] = {}
    for r in rubrics:
        for c in r.criteria:
            texts[c.id] = c.text if texts.get(c.id, c.text) == c.text else "(text varies by prompt)"
    print(f"model: {described}\nprompts: {len(rubrics)} ({split or ALL} of {path}), {G} responses each, "
          f"temperature {rollout.temperature:g}, max_new_tokens {rollout.max_new_tokens}, seed {seed}")
    print(f"{'criterion':<20} {'met':>7} {'judged':>7} {'failed':>7}  text")
    for cid, (met, judged, failed) in sorted(res.criteria.items()):
        rate = f"{met / judged:7.1%}" if judged else "      -"
        print(f"{cid:<20} {rate} {int(judged):>7} {int(failed):>7}  {texts.get(cid, '')[:60]}")
    mean = f"{res.mean_reward:.4f} +- {res.reward_stderr:.4f}" if res.scored else "-"
    print(f"\nresponses: {res.responses}  scored: {res.scored} (guarded {res.guarded})  failed: {res.failed}")
    print(f"mean reward: {mean}  (guarded responses count with their reward <= 0; failed ones are left out)")
    print(f"generation: {res.tokens} tokens in {res.generate_s:.1f}s ({res.tokens / max(res.generate_s, 1e-9):.0f} "
          f"tokens/s); scoring {res.score_s:.1f}s; wall {wall:.1f}s")
    print(f"judge: requests {metrics.get('judge_requests')}, parse failures {metrics.get('parse_failures')}, "
          f"re-asks {metrics.get('judge_reasks', 0)}")
    fp, ff = metrics.get("audit_false_pass_rate"), metrics.get("audit_false_fail_rate")
    if fp is not None or ff is not None:
        print(f"judge audit: {metrics.get('audit_canary_verdicts')} canary verdicts; false-pass rate "
              f"{'-' if fp is None else f'{fp:.1%}'} (content-free answers judged as meeting a criterion), "
              f"false-fail rate {'-' if ff is None else f'{ff:.1%}'} (reference answers judged as not)")
    return fp, ff


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 evaluated; 1 every response failed; 2 bad input."""
    from rubric_fast.rubric import RubricError, load_rubrics
    from rubric_fast.scoring.config import check_judge_coverage
    from rubric_fast.scoring.scorer import summarize_errors

    from .config import TrainConfig
    from .rewards import make_scorer
    from .rollout import make_engine

    def fail(msg: str, code: int = 2) -> int:
        print(f"rubric-fast eval: {msg}", file=sys.stderr)
        return code

    try:
        cfg = _config(args)
        base = cfg if cfg is not None else TrainConfig()
        ec = base.eval
        path = args.rubrics or (cfg.eval.path or cfg.data.path if cfg is not None else None)
        if path is None:
            raise EvalError("--rubrics: required (or give --config with data.path)")
        split = args.split if args.split is not None else ec.split
        try:
            rubrics = select_split(load_rubrics(path), split, key="--split", path=path)
        except FileNotFoundError:
            raise EvalError(f"--rubrics: no such file: {path}") from None
        except RubricError as exc:
            raise EvalError(f"--rubrics: {exc}") from None
        except ValueError as exc:
            raise EvalError(str(exc)) from None
        n_prompts = args.max_prompts if args.max_prompts is not None else ec.max_prompts
        if n_prompts:
            rubrics = rubrics[:n_prompts]
        G = args.num_generations or ec.num_generations
        if G < 1:
            raise EvalError(f"--num-generations: got {G}; expected >= 1")
        judge, scoring = _judge_settings(args, cfg)
        try:
            check_judge_coverage(rubrics, judge)
        except ValueError as exc:
            raise EvalError(str(exc)) from None
        for flag, path_ in (("--out", args.out), ("--samples", args.samples)):  # before any compute is spent
            if path_:
                try:
                    with open(path_, "a", encoding="utf-8"):
                        pass
                except OSError as exc:
                    raise EvalError(f"{flag}: cannot write {path_}: {exc.strerror}") from None
    except EvalError as exc:
        return fail(str(exc))

    import torch

    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    t_start = time.perf_counter()
    try:
        policy, tokenizer, described, _ = _load(args, cfg)
    except EvalError as exc:
        return fail(str(exc))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    policy.to(device)
    from .models import check_chat_template

    try:
        check_chat_template(tokenizer, rubrics, base.model)
    except ValueError as exc:
        return fail(str(exc))
    rollout = eval_rollout_config(base.rollout, ec, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    engine = make_engine("hf", policy, tokenizer, rollout)
    try:
        scorer = make_scorer(judge, scoring, G)
    except (ValueError, ImportError) as exc:
        return fail(f"judge / scoring: {exc}")
    seed = args.seed if args.seed is not None else ec.seed
    samples: list = []
    try:
        with seeded(seed, device):
            res = evaluate(engine, tokenizer, scorer, rubrics, num_generations=G, samples=samples)
        _wait_for_canaries(scorer.service)
        metrics = scorer.service.metrics()
    finally:
        scorer.close()
    wall = time.perf_counter() - t_start

    fp, ff = _print_report(res, metrics, rubrics, described=described, split=split, path=path, G=G,
                           rollout=rollout, seed=seed, wall=wall)
    if res.failed:
        print(f"rubric-fast eval: {res.failed} of {res.responses} responses failed: {summarize_errors(res.errors)}",
              file=sys.stderr)
    summary = {"model": described, "rubrics": str(path), "split": split or ALL, "num_generations": G,
               "temperature": rollout.temperature, "max_new_tokens": rollout.max_new_tokens, "seed": seed,
               **res.as_dict(), "wall_s": round(wall, 2),
               "judge": {"type": judge.get("type"), "model": judge.get("model"),
                         "requests": metrics.get("judge_requests"), "parse_failures": metrics.get("parse_failures"),
                         "reasks": metrics.get("judge_reasks", 0),
                         "audit_canary_verdicts": metrics.get("audit_canary_verdicts"),
                         "audit_false_pass_rate": fp, "audit_false_fail_rate": ff,
                         "guarded_by_reason": metrics.get("guarded_by_reason")}}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    if args.samples:
        with open(args.samples, "w", encoding="utf-8") as f:
            for row in samples:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if res.responses and res.failed == res.responses:
        return fail("every response failed; no score was produced", 1)
    return 0
