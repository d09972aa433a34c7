"""Run logging: metrics.jsonl, samples.jsonl, config.yaml, TensorBoard scalars and a console progress line.

Only the main rank writes or prints; on other ranks every method is a no-op, so the train loop can call the
logger unconditionally. The JSONL files are the source of truth (``rubric-fast report`` reads them); they
are flushed line by line so a crashed or running job still has a readable history. Non-finite values are
written as ``null``: a NaN loss is worth recording, and it must never take the run down or produce JSON
that other tools reject.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import yaml

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
CONFIG_FILE = "config.yaml"
TB_DIR = "tb"

# Text columns of the TensorBoard sample table are cut to this many characters (the JSONL keeps them whole).
_TB_TEXT_CHARS = 400


def _finite_or_none(value: Any) -> float | None:
    """A metric as a JSON-safe float: tensors/numpy scalars unwrapped, NaN and +-inf mapped to None."""
    if value is None:
        return None
    if hasattr(value, "item"):  # torch / numpy scalar
        value = value.item()
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _plain(obj: Any) -> Any:
    """Turn a config (dataclasses, enums, paths, tuples) into plain YAML/JSON types; floats made finite."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return _plain(obj.value)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item"):
        return _plain(obj.item())
    return str(obj)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def progress_text(metrics: dict[str, Any]) -> str:
    """The one-line summary shown on the console; only the metrics present are shown."""
    m = {k: _finite_or_none(v) for k, v in metrics.items()}
    parts: list[str] = []
    if m.get("reward") is not None:
        parts.append(f"reward {m['reward']:.3f}")
    rates = [v for k, v in m.items() if k.startswith("pass_rate/") and v is not None]
    if rates:
        # dozens of criteria do not fit on a line; their mean does
        parts.append(f"pass {sum(rates) / len(rates):.2f} ({len(rates)} crit)")
    for key, label in (("kl", "kl"), ("entropy", "ent")):
        if m.get(key) is not None:
            parts.append(f"{label} {_fmt(m[key])}")
    if m.get("clip_frac_low") is not None or m.get("clip_frac_high") is not None:
        lo, hi = m.get("clip_frac_low"), m.get("clip_frac_high")
        parts.append(f"clip {'-' if lo is None else f'{lo:.3f}'}/{'-' if hi is None else f'{hi:.3f}'}")
    if m.get("tokens_per_s") is not None:
        parts.append(f"{m['tokens_per_s']:.0f} tok/s")
    p50, p95 = m.get("judge/latency_p50"), m.get("judge/latency_p95")
    if p50 is not None or p95 is not None:
        parts.append(f"judge p50 {'-' if p50 is None else f'{p50:.2f}'}s"
                     f" p95 {'-' if p95 is None else f'{p95:.2f}'}s")
    if m.get("guarded") is not None:
        by_reason = [(k[len("guarded/"):], v) for k, v in m.items() if k.startswith("guarded/") and v]
        detail = f" ({', '.join(f'{k} {v:.0f}' for k, v in sorted(by_reason))})" if by_reason else ""
        parts.append(f"guarded {m['guarded']:.0f}{detail}")
    if m.get("judge/error_rate") is not None:
        parts.append(f"judge err {100 * m['judge/error_rate']:.1f}%")
    if m.get("eval/reward") is not None:  # eval.every: the held-out mean reward (trainer/evaluate.py)
        parts.append(f"held-out reward {m['eval/reward']:.3f}")
    return " | ".join(parts)


def _md_cell(text: Any) -> str:
    s = "" if text is None else str(text)
    if len(s) > _TB_TEXT_CHARS:
        s = s[:_TB_TEXT_CHARS] + "..."
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")


def _prompt_text(prompt: Any) -> str:
    """A prompt is a string or chat messages; show messages as `role: content` lines."""
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in prompt)
    return "" if prompt is None else str(prompt)


class MetricsLogger:
    """Writes a run's metrics, samples and config under ``run_dir`` (main rank only).

    >>> with MetricsLogger(run_dir, is_main=rank == 0, progress_total=cfg.steps) as log:
    ...     log.log_config(cfg_dict)
    ...     log.log(step, {"reward": 0.4, "kl": 1e-3, "pass_rate/c1": 0.5})
    """

    def __init__(self, run_dir: str | Path, *, is_main: bool, tensorboard: bool = True,
                 progress_total: int | None = None, purge_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self._metrics_f = None
        self._samples_f = None
        self._tb = None
        self._bar = None
        self._closed = False
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_f = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                print(f"[rubric_fast] TensorBoard logging off ({exc}); metrics still go to "
                      f"{self.run_dir / METRICS_FILE}", file=sys.stderr)
            else:
                # purge_step: a resumed run drops the events the interrupted one wrote after its checkpoint
                self._tb = SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=purge_step)
        # A live bar only on a terminal; in a log file a carriage-return bar is noise, so print lines.
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=progress_total, desc="train", unit="step", dynamic_ncols=True,
                             file=sys.stderr)
        self._progress_total = progress_total

    # -- metrics -------------------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main or self._closed:
            return
        clean = {str(k): _finite_or_none(v) for k, v in metrics.items() if k not in ("step", "time")}
        record = {"step": int(step), "time": time.time(), **clean}
        self._metrics_f.write(json.dumps(record, allow_nan=False) + "\n")
        self._metrics_f.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if value is not None:
                    self._tb.add_scalar(key, value, int(step))
        text = progress_text(clean)
        if self._bar is not None:
            self._bar.update(max(0, int(step) - self._bar.n))
            self._bar.set_postfix_str(text, refresh=True)
        else:
            total = f"/{self._progress_total}" if self._progress_total else ""
            print(f"step {int(step)}{total} | {text}", file=sys.stderr, flush=True)

    # -- samples -------------------------------------------------------------------------------------------
    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Rows of ``{prompt, response, reward, verdicts: [{criterion_id, score, reason, error}]}``."""
        if not self.is_main or self._closed or not rows:
            return
        if self._samples_f is None:
            self._samples_f = open(self.run_dir / SAMPLES_FILE, "a", encoding="utf-8")
        lines = []
        for row in rows:
            verdicts = [{"criterion_id": v.get("criterion_id"), "score": _finite_or_none(v.get("score")),
                         "reason": v.get("reason"), "error": v.get("error")}
                        for v in (_verdict_dict(v) for v in row.get("verdicts") or [])]
            obj = {**_plain({k: v for k, v in row.items() if k not in ("reward", "verdicts")}),
                   "step": int(step), "reward": _finite_or_none(row.get("reward")), "verdicts": verdicts}
            lines.append(json.dumps(obj, allow_nan=False, ensure_ascii=False) + "\n")
        self._samples_f.write("".join(lines))
        self._samples_f.flush()
        if self._tb is not None:
            table = ["| reward | prompt | response | verdicts |", "|---|---|---|---|"]
            for line in lines:
                obj = json.loads(line)
                verdicts = "; ".join(
                    f"{v['criterion_id']}={'ERR' if v['score'] is None else _fmt(v['score'])}" for v in obj["verdicts"])
                reward = "None" if obj["reward"] is None else f"{obj['reward']:.3f}"
                table.append(f"| {reward} | {_md_cell(_prompt_text(obj.get('prompt')))} | "
                             f"{_md_cell(obj.get('response'))} | {_md_cell(verdicts)} |")
            self._tb.add_text("samples", "\n".join(table), int(step))

    # -- config --------------------------------------------------------------------------------------------
    def log_config(self, cfg: dict[str, Any]) -> None:
        if not self.is_main or self._closed:
            return
        text = yaml.safe_dump(_plain(cfg), sort_keys=False, allow_unicode=True)
        (self.run_dir / CONFIG_FILE).write_text(text, encoding="utf-8")
        msg = f"[rubric_fast] config ({self.run_dir / CONFIG_FILE}):\n{text}"
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)  # above the live bar, not through it
        else:
            print(msg, file=sys.stderr, flush=True)
        if self._tb is not None:
            self._tb.add_text("config", "```yaml\n" + text + "```", 0)

    # -- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for f in (self._metrics_f, self._samples_f):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _verdict_dict(v: Any) -> dict[str, Any]:
    """Verdicts arrive as dicts or as ``Verdict`` dataclasses from the judges."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    return dict(v)
