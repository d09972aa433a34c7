"""``rubric-fast score DATA.jsonl --rubrics R --judge ...``: score responses offline, print pass rates.

DATA.jsonl rows: ``{"rubric_id": ..., "response": ...}`` (also accepted: ``id``/``prompt_id`` for the rubric
id, ``index`` for the rubric's position in the file, ``completion`` for the response). ``--judge`` is
``rule``, ``http``, ``hf``, ``embedding``, or a YAML/JSON file holding the judge mapping (or a whole scorer
config with a ``judge`` key). Re-running with the same ``--cache`` asks the judge only for what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="jsonl with rubric_id (or index) and response per row")
    p.add_argument("--rubrics", required=True, help="rubric file (HealthBench/RaR jsonl, verl parquet, "
                                                    "OpenRubrics jsonl, rubric_fast jsonl)")
    p.add_argument("--format", default="auto", help="rubric format (default: detect)")
    p.add_argument("--judge", default="rule", help="rule | http | hf | embedding | path to a YAML/JSON config")
    p.add_argument("--model", help="judge model (http: served model name; hf: name or path)")
    p.add_argument("--endpoint", action="append", default=[], help="OpenAI-compatible base URL, e.g. "
                   "http://localhost:8000/v1 (repeat for several)")
    p.add_argument("--api-key-env", help="NAME of the environment variable holding the API key")
    p.add_argument("--mode", choices=["per_criterion", "batch", "holistic"], help="LLM judge mode")
    p.add_argument("--concurrency", type=int, help="judge calls in flight")
    p.add_argument("--cache", help="SQLite verdict cache file (re-used on the next run)")
    p.add_argument("--no-guard", action="store_true", help="send junk responses to the judge too")
    p.add_argument("--deadline-s", type=float, default=600.0, help="per-response deadline in seconds")
    p.add_argument("--out", help="write one scored row per response to this jsonl")
    p.add_argument("--max-error-rate", type=float, default=0.0,
                   help="exit 1 when more than this fraction of the responses failed (default 0: any failure; "
                        "exit 1 always when every response failed)")


def _judge_config(args) -> tuple[dict, dict]:
    scoring: dict = {}
    if args.judge in ("rule", "http", "hf", "embedding"):
        judge: dict = {"type": args.judge}
    else:
        path = Path(args.judge)
        if not path.is_file():
            raise ValueError(f"--judge: {args.judge!r} is neither rule, http, hf, embedding nor an existing file")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix in (".yaml", ".yml"):
                import yaml

                cfg = yaml.safe_load(text)
            else:
                cfg = json.loads(text)
        except OSError as exc:
            raise ValueError(f"--judge: cannot read {path}: {exc.strerror}") from None
        except Exception as exc:  # noqa: BLE001 - yaml / json syntax errors: one line with the position
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else f"{path}:{getattr(exc, 'lineno', '?')}"
            raise ValueError(f"--judge: {where}: cannot parse: {getattr(exc, 'problem', None) or exc}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"--judge {path}: must hold a mapping (the judge keys, or a scorer config with 'judge')")
        if "judge" in cfg:
            scoring = {k: v for k, v in cfg.items() if k != "judge"}
            if not isinstance(cfg["judge"], dict):
                raise ValueError(f"--judge {path}: key 'judge': must be a mapping such as {{type: http, ...}}")
            judge = dict(cfg["judge"])
        else:
            judge = cfg
    if args.model:
        judge["model"] = args.model
    if args.endpoint:
        judge["endpoints"] = args.endpoint
    if args.api_key_env:
        judge["api_key_env"] = args.api_key_env
    if args.mode:
        judge["mode"] = args.mode
    if args.concurrency:
        judge["concurrency"] = args.concurrency
    return judge, scoring


def _fail(msg: str, code: int = 2) -> int:
    print(f"rubric-fast score: {msg}", file=sys.stderr)
    return code


def _read_rows(args, rubrics) -> list[tuple[int, object, str]]:
    by_id = {r.id: r for r in rubrics}
    rows = []
    with open(args.data, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{args.data}:{lineno}: invalid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{args.data}:{lineno}: expected a JSON object with rubric_id and response")
            rid = row.get("rubric_id", row.get("prompt_id", row.get("id")))
            if rid is not None and str(rid) in by_id:
                rubric = by_id[str(rid)]
            elif isinstance(row.get("index"), int) and 0 <= row["index"] < len(rubrics):
                rubric = rubrics[row["index"]]
            else:
                raise ValueError(f"{args.data}:{lineno}: key 'rubric_id': no rubric {rid!r} in {args.rubrics} "
                                 f"(or give 'index' in 0..{len(rubrics) - 1})")
            resp = row.get("response", row.get("completion"))
            if not isinstance(resp, str):
                raise ValueError(f"{args.data}:{lineno}: key 'response': must be a string")
            rows.append((lineno, rubric, resp))
    return rows


def _tally(rows, results: dict, out):
    """Per criterion: met / judged / failed counts; the judged rewards, guarded rows and errors; each row's
    result to ``out`` (jsonl) when given."""
    from .scorer import rollout_errors

    met = defaultdict(int)
    judged = defaultdict(int)
    failed = defaultdict(int)
    judged_rewards, guarded_rows, errors = [], 0, []
    for lineno, rubric, resp in rows:
        m = results.get(lineno)
        if m is None:
            errors.append("no result (the scorer was closed)")
            continue
        if m.reward is None:
            errors.extend(rollout_errors(m) or ["unknown error"])
        elif m.guarded:
            guarded_rows += 1
        else:
            judged_rewards.append(m.reward)
        for v in m.verdicts:
            if v.guarded and v.criterion_id == "__holistic__" and rubric.aggregation.method != "implicit_likert":
                continue
            if v.score is None:
                failed[v.criterion_id] += 1
            else:
                judged[v.criterion_id] += 1
                met[v.criterion_id] += v.score >= 0.5
        if out:
            out.write(json.dumps({"line": lineno, "rubric_id": rubric.id, "reward": m.reward, "error": m.error,
                                  "guarded": m.guarded, "guard_reason": m.guard_reason,
                                  "verdicts": [{"criterion_id": v.criterion_id, "score": v.score,
                                                "reason": v.reason, "error": v.error} for v in m.verdicts]},
                                 ensure_ascii=False) + "\n")
    return met, judged, failed, judged_rewards, guarded_rows, errors


def _print_table(rubrics, rows, met, judged, failed, judged_rewards, guarded_rows, metrics: dict) -> int:
    """The pass-rate table and the summary lines; returns the number of failed responses."""
    texts: dict[str, str] = {}
    for r in rubrics:
        for c in r.criteria:
            texts[c.id] = c.text if texts.get(c.id, c.text) == c.text else "(text varies by prompt)"
    print(f"{'criterion':<14} {'met':>7} {'judged':>7} {'failed':>7}  text")
    for cid in sorted(set(judged) | set(failed)):
        n = judged[cid]
        rate = f"{met[cid] / n:7.1%}" if n else "      -"
        print(f"{cid:<14} {rate} {n:>7} {failed[cid]:>7}  {texts.get(cid, '')[:60]}")
    n_failed = len(rows) - len(judged_rewards) - guarded_rows
    mean = f"{sum(judged_rewards) / len(judged_rewards):.4f}" if judged_rewards else "-"
    print(f"\nresponses: {len(rows)}  judged: {len(judged_rewards)}  guarded: {guarded_rows}  failed: {n_failed}")
    print(f"mean reward of judged responses: {mean}  (guarded responses score 0 and are not in this mean)")
    by_reason = metrics.get("guarded_by_reason") or {}
    print(f"judge requests: {metrics['judge_requests']}  verdicts requested: {metrics['verdicts_requested']}  "
          f"cache hits: {metrics['cache_hits']}  parse failures: {metrics['parse_failures']}  guarded by reason: "
          + (", ".join(f"{k} {v}" for k, v in sorted(by_reason.items())) or "-"))
    if metrics.get("audit_false_pass_rate") is not None:
        print(f"judge audit: false-pass rate {metrics['audit_false_pass_rate']:.1%} on "
              f"{metrics['audit_canary_verdicts']} canary verdicts")
    return n_failed


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 scored; 1 every row failed, or the failed fraction passed --max-error-rate; 2 bad input."""
    from rubric_fast.rubric import RubricError, load_rubrics

    from .config import build_service, check_judge_coverage
    from .scorer import summarize_errors

    if not 0.0 <= args.max_error_rate <= 1.0:
        return _fail(f"--max-error-rate: expected a number in [0, 1], got {args.max_error_rate:g}")
    try:
        rubrics = load_rubrics(args.rubrics, args.format)
    except FileNotFoundError as exc:
        return _fail(f"--rubrics: no such file: {exc.filename or args.rubrics}")
    except (RubricError, OSError, ValueError) as exc:
        return _fail(f"--rubrics: {exc}")
    try:
        rows = _read_rows(args, rubrics)
    except FileNotFoundError:
        return _fail(f"DATA: no such file: {args.data}")
    except IsADirectoryError:
        return _fail(f"DATA: {args.data} is a directory, expected a jsonl file")
    except UnicodeDecodeError as exc:
        return _fail(f"DATA: {args.data} is not UTF-8 text ({exc.reason})")
    except OSError as exc:
        return _fail(f"DATA: cannot read {args.data}: {exc.strerror}")
    except ValueError as exc:
        return _fail(str(exc))
    try:
        judge, scoring = _judge_config(args)
        check_judge_coverage(rubrics, judge)
    except ValueError as exc:
        return _fail(str(exc))
    out = None
    if args.out:  # before any judge call: a bad --out must not cost a scoring run
        try:
            out = open(args.out, "w", encoding="utf-8")
        except OSError as exc:
            return _fail(f"--out: cannot write {args.out}: {exc.strerror}")
    if args.no_guard:
        scoring["guard"] = False
    scoring.setdefault("cache_path", args.cache)
    scoring.update(min_valid=0, max_error_rate=1.0, deadline_s=args.deadline_s)
    try:
        svc = build_service({"judge": judge, **scoring})
    except (ValueError, ImportError, OSError) as exc:
        if out:
            out.close()
        return _fail(str(exc))
    results = {}
    with svc:
        for lineno, rubric, resp in rows:
            svc.submit(lineno, str(lineno), rubric, resp, group_size=1)
        for g in svc.iter_groups(timeout=None):
            for m in g.members:
                results[int(m.rollout_id)] = m
        metrics = svc.metrics()

    try:
        met, judged, failed, judged_rewards, guarded_rows, errors = _tally(rows, results, out)
    finally:
        if out:
            out.close()
    n_failed = _print_table(rubrics, rows, met, judged, failed, judged_rewards, guarded_rows, metrics)
    if n_failed:
        print(f"rubric-fast score: {n_failed} of {len(rows)} responses failed: {summarize_errors(errors)}",
              file=sys.stderr)
    if rows and n_failed == len(rows):
        return _fail("every response failed; no score was produced", 1)
    if rows and n_failed / len(rows) > args.max_error_rate:
        return _fail(f"{n_failed / len(rows):.0%} of the responses failed, more than --max-error-rate="
                     f"{args.max_error_rate:g}", 1)
    return 0
