"""The run directory: one run per directory, unless the run is continued or knowingly replaced.

Before anything is written (rank 0 decides, every rank follows):

* ``logging.run_dir`` and the checkpoint directory must be creatable and writable; a path under a file, a
  read-only file system or a missing permission is one line naming the key;
* a directory that already holds a run (rows in ``metrics.jsonl`` / ``samples.jsonl``, or checkpoints) is
  refused unless ``checkpoint.resume`` is set (``auto`` or a path: the run continues) or
  ``logging.overwrite: true`` (the previous run's metrics, samples, config, TensorBoard logs and checkpoints
  are removed; the content-addressed verdict cache is kept);
* a resumed run cuts ``metrics.jsonl`` and ``samples.jsonl`` back to the checkpoint's step, so no step
  appears twice; ``resume=auto`` without a checkpoint says that it starts fresh and clears them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from .checkpoint import read_manifest, resolve_resume
from .config import ConfigError
from .logger import CONFIG_FILE, METRICS_FILE, SAMPLES_FILE, TB_DIR


def _has_rows(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return any(line.strip() for line in f)
    except FileNotFoundError:
        return False


def existing_run(run_dir: Path, ckpt_dir: Path) -> list[str]:
    """What of an earlier run is in ``run_dir`` (empty: nothing)."""
    found = [name for name in (METRICS_FILE, SAMPLES_FILE) if _has_rows(run_dir / name)]
    if ckpt_dir.is_dir() and any(p.name.startswith("step_") for p in ckpt_dir.iterdir()):
        found.append(f"checkpoints in {ckpt_dir}")
    return found


def os_error_text(exc: OSError, path: Path | str) -> str:
    return f"cannot write {exc.filename or path}: {exc.strerror or exc}"


def _writable(path: Path, key: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".rubric_fast_write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key}: {os_error_text(exc, path)}") from None


def cut_jsonl(path: Path, last_step: int) -> int:
    """Keep the rows of a JSONL log with ``step <= last_step``; returns how many were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            step = 0
        if isinstance(step, int) and step > last_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def prepare_run_dir(run_dir: Path, ckpt_dir: Path, *, resume: str, overwrite: bool,
                    say=lambda msg: print(f"[rubric_fast] {msg}", file=sys.stderr)) -> int:
    """Check, refuse, replace or cut back ``run_dir`` (rank 0 only); returns the step the run starts from.

    Raises :class:`ConfigError` naming the key when the directory cannot be used."""
    _writable(run_dir, "logging.run_dir")
    _writable(ckpt_dir, "checkpoint.dir" if ckpt_dir.parent != run_dir else "logging.run_dir")
    found = existing_run(run_dir, ckpt_dir)
    try:
        if found and overwrite:
            for name in (METRICS_FILE, SAMPLES_FILE, CONFIG_FILE):
                (run_dir / name).unlink(missing_ok=True)
            shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)
            for p in ckpt_dir.iterdir():
                if p.name.startswith("step_"):
                    shutil.rmtree(p)
            say(f"logging.overwrite=true: removed the previous run in {run_dir} ({', '.join(found)})")
            found = []
        if found and resume == "never":
            raise ConfigError(
                f"logging.run_dir: {run_dir} already holds a run ({', '.join(found)}); continue it with "
                "checkpoint.resume=auto, replace it with logging.overwrite=true, or choose another logging.run_dir")
        resume_from = resolve_resume(resume, ckpt_dir)
        start = int(read_manifest(resume_from).get("step", 0)) if resume_from is not None else 0
        if resume_from is None and resume == "auto":
            cleared = f"; clearing the earlier {' and '.join(found)}" if found else ""
            say(f"checkpoint.resume=auto: no checkpoint in {ckpt_dir}, starting fresh{cleared}")
            if found:
                shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)
        for name in (METRICS_FILE, SAMPLES_FILE):
            dropped = cut_jsonl(run_dir / name, start)
            if dropped and resume_from is not None:
                say(f"{name}: dropped {dropped} rows after step {start} (written after the checkpoint {resume_from})")
    except OSError as exc:
        raise ConfigError(f"logging.run_dir: {os_error_text(exc, run_dir)}") from None
    return start
