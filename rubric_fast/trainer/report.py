"""`rubric-fast report RUN_DIR`: PNG plots of a run's curves and an index.html with recent samples.

Reads what :mod:`rubric_fast.trainer.logger` writes (metrics.jsonl, samples.jsonl, config.yaml) and plots
only the curves that are present. matplotlib is imported inside :func:`write_report` so that building the
CLI parser (which imports every subcommand module) does not pay for it.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path
from typing import Any

from rubric_fast.trainer.logger import CONFIG_FILE, METRICS_FILE, SAMPLES_FILE, _prompt_text

# (file stem, title, y label, keys; a key ending in "/" is a prefix matching every key under it)
PLOTS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("reward", "Reward", "reward", ("reward",)),
    ("pass_rates", "Per-criterion pass rate", "pass rate", ("pass_rate/",)),
    # eval.every: the held-out mean reward and pass rates at the start, every N steps and at the end
    ("eval", "Held-out evaluation", "mean reward / pass rate", ("eval/reward", "eval/pass_rate/")),
    ("kl", "KL to reference", "kl", ("kl",)),
    ("entropy", "Entropy", "nats / token", ("entropy",)),
    ("clip_frac", "Clip fractions", "fraction of tokens", ("clip_frac_low", "clip_frac_high")),
    ("loss", "Loss", "loss", ("loss",)),
    ("tokens_per_s", "Throughput", "tokens / s", ("tokens_per_s",)),
    ("judge_latency", "Judge latency", "seconds", ("judge/latency_p50", "judge/latency_p95")),
    ("judge_error_rate", "Judge error rate", "fraction of judgements", ("judge/error_rate",)),
]


class ReportError(Exception):
    """A problem with the run directory that the user can fix; the message names the file (and line)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl (samples.jsonl, "
                                                    "config.yaml optional)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/report)")
    parser.add_argument("--samples", type=int, default=20, metavar="N",
                        help="show the last N samples from samples.jsonl (default: 20)")


def run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print("rubric-fast report: needs matplotlib, which is not installed: pip install 'rubric_fast[report]'",
              file=sys.stderr)
        return 2
    try:
        index = write_report(args.run_dir, args.out, last_samples=args.samples)
    except ReportError as exc:
        print(f"rubric-fast report: {exc}", file=sys.stderr)
        return 2
    print(f"rubric-fast report: wrote {index}")
    return 0


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Objects of a JSONL file. A malformed line is an error naming file and line, except an unterminated
    last line: the logger ends every record with a newline, so that is a write in progress (a running or
    killed job) and is skipped with a note instead of failing the whole report."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines) and not text.endswith("\n"):
                print(f"rubric-fast report: {path}:{lineno}: skipping incomplete last line", file=sys.stderr)
                continue
            raise ReportError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise ReportError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append(obj)
    return records


def curves(records: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (steps, values) for every numeric metric, in step order; nulls (non-finite at log time) are gaps.

    Records are merged by step, later ones winning: a step may be logged in several calls, and a resumed run
    appends to the same file and re-logs the steps after its checkpoint."""
    by_step: dict[float, dict[str, Any]] = {}
    for i, rec in enumerate(records):
        step = rec.get("step", i)
        if isinstance(step, (int, float)) and not isinstance(step, bool):
            by_step.setdefault(step, {}).update(rec)
    out: dict[str, tuple[list[float], list[float]]] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                xs, ys = out.setdefault(key, ([], []))
                xs.append(step)
                ys.append(float(value))
    return out


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _keys_for(spec: tuple[str, ...], data: dict[str, Any]) -> list[str]:
    keys: list[str] = []
    for k in spec:
        keys += sorted(d for d in data if d.startswith(k)) if k.endswith("/") else [k] if k in data else []
    return keys


def plot_curves(data: dict[str, tuple[list[float], list[float]]], out_dir: Path) -> list[tuple[str, str]]:
    """Write one PNG per present plot; returns (file name, title) pairs in display order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for stem, title, ylabel, spec in PLOTS:
        keys = _keys_for(spec, data)
        if not keys:
            continue
        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
        ax = fig.add_subplot()
        for key in keys:
            xs, ys = data[key]
            label = key.removeprefix("pass_rate/") if stem == "pass_rates" else key.removeprefix("eval/")
            if stem == "reward":
                window = max(1, min(50, len(ys) // 10))
                ax.plot(xs, ys, alpha=0.35, label="reward")
                ax.plot(xs, rolling_mean(ys, window), label=f"rolling mean ({window})")
            elif stem == "eval":  # a few points: markers, the reward drawn bold
                ax.plot(xs, ys, marker="o", linewidth=2.5 if key == "eval/reward" else 1.0,
                        alpha=1.0 if key == "eval/reward" else 0.6, label=label)
            else:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(ax.lines) > 1 and len(keys) <= 20:
            ax.legend(fontsize="small", loc="best")
        fig.tight_layout()
        name = f"{stem}.png"
        fig.savefig(out_dir / name, format="png")
        written.append((name, title))
    return written


def _text(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _samples_table(samples: list[dict[str, Any]]) -> str:
    if not samples:
        return "<p>No samples.</p>"
    rows = ["<table><tr><th>step</th><th>reward</th><th>prompt</th><th>response</th><th>verdicts</th></tr>"]
    for s in samples:
        reward = s.get("reward")
        reward_txt = "failed" if reward is None else (f"{reward:.3f}" if isinstance(reward, (int, float))
                                                      else str(reward))
        verdicts = []
        for v in s.get("verdicts") or []:
            if not isinstance(v, dict):
                verdicts.append(_text(v))
                continue
            score = v.get("score")
            line = f"<b>{_text(v.get('criterion_id'))}</b>: {'ERR' if score is None else _text(score)}"
            if v.get("reason"):
                line += f" &mdash; {_text(v['reason'])}"
            if v.get("error"):
                line += f" <span class=err>[{_text(v['error'])}]</span>"
            verdicts.append(line)
        rows.append(f"<tr><td>{_text(s.get('step'))}</td><td>{_text(reward_txt)}</td>"
                    f"<td><pre>{_text(_prompt_text(s.get('prompt')))}</pre></td>"
                    f"<td><pre>{_text(s.get('response'))}</pre></td>"
                    f"<td>{'<br>'.join(verdicts)}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


_CSS = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px}img{max-width:100%}"
        ".plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:1em}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px;"
        "vertical-align:top}pre{white-space:pre-wrap;margin:0;max-height:20em;overflow:auto}.err{color:#b00}")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, *, last_samples: int = 20) -> Path:
    """Write the PNGs and index.html for ``run_dir``; returns the path of index.html."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: run directory not found")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ReportError(f"{metrics_path}: not found (expected the metrics file that the trainer writes)")
    records = read_jsonl(metrics_path)
    samples_path = run_dir / SAMPLES_FILE
    samples = read_jsonl(samples_path) if samples_path.is_file() else []
    samples = samples[-last_samples:] if last_samples > 0 else []
    config_path = run_dir / CONFIG_FILE
    config = config_path.read_text(encoding="utf-8") if config_path.is_file() else None

    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(curves(records), out_dir)

    steps = [r["step"] for r in records if isinstance(r.get("step"), (int, float))]
    summary = f"{len(records)} metric records" + (f", steps {min(steps)}&ndash;{max(steps)}" if steps else "")
    plot_html = "\n".join(f'<figure><a href="{html.escape(name)}"><img src="{html.escape(name)}" '
                          f'alt="{html.escape(title)}"></a><figcaption>{html.escape(title)}</figcaption></figure>'
                          for name, title in plots) or "<p>No curves in metrics.jsonl.</p>"
    config_html = f"<pre>{_text(config)}</pre>" if config is not None else "<p>No config.yaml.</p>"
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>rubric_fast report: {_text(run_dir.name)}</title>
<style>{_CSS}</style></head><body>
<h1>Run {_text(run_dir.name)}</h1>
<p>{_text(run_dir.resolve())} &middot; {summary}</p>
<h2>Curves</h2>
<div class=plots>
{plot_html}
</div>
<h2>Last {len(samples)} samples</h2>
{_samples_table(samples)}
<h2>Config</h2>
{config_html}
</body></html>
"""
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
