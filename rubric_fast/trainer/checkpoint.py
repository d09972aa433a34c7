"""Checkpoints: one directory per step holding everything needed to continue the run exactly.

Layout of ``<checkpoint.dir>/step_XXXXXXXX/``::

    state.pt            (rank 0) model state_dict (ddp; adapters included with LoRA), optimizer state_dict
                        (ddp: the optimizer is replicated, rank 0's copy), LR scheduler, the global train
                        state (step, policy version, data position, counters, consecutive NaN count), the
                        judge cache location, the resolved config, world size and strategy
    rank_RRRRR.pt       (every rank) its RNG states (python, numpy, torch CPU, CUDA), its group counter and
                        the batches it generated ahead of training (overlap; re-scored on resume, the judge
                        cache answers), i.e. everything that differs between ranks
    sharded/            (fsdp2) model and optimizer shards through torch.distributed.checkpoint: one
                        ``__R_0.distcp`` file per rank plus ``.metadata``
    manifest.json       written last: world size and the files above; its presence marks a complete checkpoint

Atomicity: every rank writes into ``step_XXXXXXXX.tmp``; after a barrier (every rank's files complete)
rank 0 writes the manifest and renames the directory. A crash at any moment leaves either the previous
checkpoints untouched or a ``.tmp`` directory that ``resume=auto`` ignores. Only the last ``keep_last``
complete checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from .dist import barrier

STATE_FILE = "state.pt"
MANIFEST = "manifest.json"
SHARDED_DIR = "sharded"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (incomplete, or written by a different world size)."""


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # plain python values, so the checkpoint loads with torch.load(weights_only=True)
        state["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))
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

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def checkpoint_problem(path: str | Path) -> str | None:
    """None when ``path`` is a complete checkpoint, else what is missing."""
    p = Path(path)
    if not p.is_dir():
        return f"{p} is not a directory"
    if not (p / MANIFEST).exists():
        return (f"{p} has no {MANIFEST}: the checkpoint was not finished (the run was killed while writing "
                "it, or files were not copied completely)")
    try:
        manifest = json.loads((p / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"{p / MANIFEST} is unreadable ({exc})"
    missing = [f for f in manifest.get("files", []) if not (p / f).exists()]
    if missing:
        return f"{p} is incomplete: missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
    return None


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir()
             if (m := _STEP_DIR.match(p.name)) and checkpoint_problem(p) is None]
    return [p for _, p in sorted(found)]


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(ckpt_dir: str | Path, step: int, bundle: dict[str, Any] | None, *, keep_last: int = 2,
                    rank_state: dict[str, Any] | None = None, sharded: dict[str, Any] | None = None,
                    rank: int = 0, world_size: int = 1, on_event: Callable[..., None] | None = None) -> Path:
    """Write one checkpoint; a collective when several ranks run (call it on every rank).

    ``bundle`` is rank 0's ``state.pt`` (ignored elsewhere), ``rank_state`` this rank's ``rank_RRRRR.pt``,
    ``sharded`` a state dict of DTensors saved with ``torch.distributed.checkpoint`` (every rank).
    """
    d = Path(ckpt_dir)
    final = d / f"step_{step:08d}"
    tmp = d / f"step_{step:08d}.tmp"
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    files = [STATE_FILE]
    if sharded is not None:
        import torch.distributed.checkpoint as dcp

        dcp.save(sharded, checkpoint_id=str(tmp / SHARDED_DIR))
        files.append(f"{SHARDED_DIR}/.metadata")
    if rank_state is not None:
        _save(rank_state, tmp / rank_file(rank))
        files += [rank_file(r) for r in range(world_size)]
        if on_event is not None:  # the run's callbacks (callbacks.py): this rank's files are written
            on_event("checkpoint", step, rank)
    if rank == 0:
        _save(bundle, tmp / STATE_FILE)
    barrier()  # every rank's files are complete before the checkpoint becomes visible
    if rank == 0:
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "world_size": world_size, "files": files}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(d)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def resolve_resume(resume: str, ckpt_dir: str | Path, *, quiet: bool = False) -> Path | None:
    """``never`` -> None; ``auto`` -> the newest complete checkpoint in ckpt_dir or None; else a path.

    ``auto`` skips (and names) unfinished ones; an explicit path to an incomplete checkpoint is refused.
    """
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_dir)
        newest = int(found[-1].name.split("_")[1]) if found else -1
        d = Path(ckpt_dir)
        if d.is_dir():
            for p in sorted(d.iterdir()):
                m = re.match(r"^step_(\d+)(\.tmp)?$", p.name)
                if m and int(m.group(1)) > newest and p not in found and not quiet:
                    print(f"[rubric_fast] checkpoint.resume=auto: skipping {p}: "
                          f"{checkpoint_problem(p) if not m.group(2) else 'unfinished (.tmp)'}", file=sys.stderr)
        return found[-1] if found else None
    p = Path(resume)
    problem = checkpoint_problem(p)
    if problem is not None:
        raise CheckpointError(f"checkpoint.resume: cannot resume from {problem}; pick a complete step_XXXXXXXX "
                              "directory, or use 'auto' (the newest complete one) or 'never'")
    return p


def load_checkpoint(path: str | Path, rank: int = 0, world_size: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.pt, this rank's rank file); refuses a checkpoint written with a different world size."""
    p = Path(path)
    saved = read_manifest(p).get("world_size", 1)
    if saved != world_size:
        raise CheckpointError(f"checkpoint {p} was written by {saved} ranks, this run has {world_size}: per-rank "
                              "RNG states and batches generated ahead cannot be split differently; resume with "
                              f"{saved} ranks (torchrun --nproc_per_node ... so that WORLD_SIZE={saved})")
    # weights_only: a checkpoint is data (tensors, numbers, strings, containers), never code to unpickle
    state = torch.load(p / STATE_FILE, map_location="cpu", weights_only=True)
    rank_state = torch.load(p / rank_file(rank), map_location="cpu", weights_only=True)
    return state, rank_state


def load_sharded(path: str | Path, state: dict[str, Any]) -> None:
    """Fill ``state`` (DTensors, as from ``get_state_dict``) in place from ``<path>/sharded``."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=str(Path(path) / SHARDED_DIR))
