"""Checkpoints: one directory per step holding everything needed to continue the run.

State bundle (``state.pt`` in ``<dir>/step_XXXXXXXX/``)::

    model          the policy's state_dict (adapters included with LoRA)
    optimizer      optimizer state_dict
    scheduler      LR scheduler state_dict
    rng            python / torch CPU / torch CUDA RNG states of this rank
    train_state    step, policy_version, data position (epoch, index), consecutive NaN count, counters,
                   group counter, next rollout step, and the batches generated ahead of training (overlap):
                   their completions and sampler log-probs, re-scored on resume
    config         the whole run config (as a dict), for reference

A checkpoint is written to ``step_XXXXXXXX.tmp`` and renamed when complete, so a crash mid-write never
leaves a directory that ``resume=auto`` would pick. Only the last ``keep_last`` are kept.

Written by rank 0 only for now; TODO(distributed): per-rank RNG / pending batches / optimizer shards and
FSDP2 sharded state dicts.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def save_checkpoint(ckpt_dir: str | Path, step: int, bundle: dict[str, Any], *, keep_last: int = 2) -> Path:
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step_{step:08d}"
    tmp = d / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(bundle, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(d)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(resume: str, ckpt_dir: str | Path) -> Path | None:
    """``never`` -> None; ``auto`` -> the newest complete checkpoint in ckpt_dir or None; else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_dir)
        return found[-1] if found else None
    p = Path(resume)
    if not (p / STATE_FILE).exists():
        raise FileNotFoundError(f"checkpoint.resume: {p} has no {STATE_FILE}; expected a step_XXXXXXXX directory, "
                                "'auto' or 'never'")
    return p


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
