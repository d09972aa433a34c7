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


def _judge_config(args) -> tuple[dict, dict]:
    scoring: dict = {}
    if args.judge in ("rule", "http", "hf", "embedding"):
        judge: dict = {"type": args.judge}
    else:
        path = Path(args.judge)
        if not path.exists():
            raise SystemExit(f"--judge: {args.judge!r} is neither rule/http/hf/embedding nor an existing file")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            cfg = yaml.safe_load(text)
        else:
            cfg = json.loads(text)
        if not isinstance(cfg, dict):
            raise SystemExit(f"--judge {path}: must hold a mapping")
        if "judge" in cfg:
            scoring = {k: v for k, v in cfg.items() if k != "judge"}
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


def run(args: argparse.Namespace) -> int:
    from rubric_fast.rubric import RubricError, load_rubrics

    from .config import build_service

    try:
        rubrics = load_rubrics(args.rubrics, args.format)
    except (RubricError, FileNotFoundError, ValueError) as exc:
        print(f"rubric-fast score: {exc}", file=sys.stderr)
        return 2
    by_id = {r.id: r for r in rubrics}
    rows = []
    with open(args.data, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                print(f"rubric-fast score: {args.data}:{lineno}: invalid JSON: {exc.msg}", file=sys.stderr)
                return 2
            rid = row.get("rubric_id", row.get("prompt_id", row.get("id")))
            if rid is not None and str(rid) in by_id:
                rubric = by_id[str(rid)]
            elif isinstance(row.get("index"), int) and 0 <= row["index"] < len(rubrics):
                rubric = rubrics[row["index"]]
            else:
                print(f"rubric-fast score: {args.data}:{lineno}: key 'rubric_id': no rubric {rid!r} in "
                      f"{args.rubrics} (or give 'index' in 0..{len(rubrics) - 1})", file=sys.stderr)
                return 2
            resp = row.get("response", row.get("completion"))
            if not isinstance(resp, str):
                print(f"rubric-fast score: {args.data}:{lineno}: key 'response': must be a string", file=sys.stderr)
                return 2
            rows.append((lineno, rubric, resp))

    judge, scoring = _judge_config(args)
    if args.no_guard:
        scoring["guard"] = False
    scoring.setdefault("cache_path", args.cache)
    scoring.update(min_valid=0, max_error_rate=1.0, deadline_s=args.deadline_s)
    try:
        svc = build_service({"judge": judge, **scoring})
    except (ValueError, ImportError) as exc:
        print(f"rubric-fast score: {exc}", file=sys.stderr)
        return 2
    results = {}
    with svc:
        for lineno, rubric, resp in rows:
            svc.submit(lineno, str(lineno), rubric, resp, group_size=1)
        for g in svc.iter_groups(timeout=None):
            for m in g.members:
                results[int(m.rollout_id)] = m
        metrics = svc.metrics()

    met = defaultdict(int)
    judged = defaultdict(int)
    failed = defaultdict(int)
    rewards = []
    out = open(args.out, "w", encoding="utf-8") if args.out else None
    for lineno, rubric, resp in rows:
        m = results.get(lineno)
        if m is None:
            continue
        if m.reward is not None:
            rewards.append(m.reward)
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
                                  "guarded": m.guarded,
                                  "verdicts": [{"criterion_id": v.criterion_id, "score": v.score,
                                                "reason": v.reason, "error": v.error} for v in m.verdicts]},
                                 ensure_ascii=False) + "\n")
    if out:
        out.close()
    texts: dict[str, str] = {}
    for r in rubrics:
        for c in r.criteria:
            texts[c.id] = c.text if texts.get(c.id, c.text) == c.text else "(text varies by prompt)"
    print(f"{'criterion':<14} {'met':>7} {'judged':>7} {'failed':>7}  text")
    for cid in sorted(set(judged) | set(failed)):
        n = judged[cid]
        rate = f"{met[cid] / n:7.1%}" if n else "      -"
        print(f"{cid:<14} {rate} {n:>7} {failed[cid]:>7}  {texts.get(cid, '')[:60]}")
    mean = sum(rewards) / len(rewards) if rewards else float("nan")
    print(f"\nresponses: {len(rows)}  scored: {len(rewards)}  failed: {len(rows) - len(rewards)}  "
          f"mean reward: {mean:.4f}")
    print(f"judge requests: {metrics['judge_requests']}  verdicts requested: {metrics['verdicts_requested']}  "
          f"cache hits: {metrics['cache_hits']}  guarded: {metrics['guarded']}  "
          f"parse failures: {metrics['parse_failures']}")
    return 0
