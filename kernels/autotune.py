"""Autotuning of the logits-GEMM tile, once per (dtype, arch, H, V), remembered on disk.

With ``RUBRIC_FAST_AUTOTUNE=1`` on a GPU, the first launch for a new (dtype, arch, H, V) times the forward
tile kernel (statistics, no stored logits) of each candidate of :func:`plan.tile_candidates` on the call's
own weight and up to 4096 of its rows, and keeps the fastest in :mod:`kernels.plan` (so the plan, the
launchers and ``rubric-fast bench --plan`` agree) and in a JSON file (``RUBRIC_FAST_CACHE_DIR``, default
``~/.cache/rubric_fast``), keyed also by the Triton version. Off by default: a first call then compiles
and times every candidate (seconds). Every candidate is compiled by ``rubric-fast compile-check``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import plan


def enabled() -> bool:
    return os.environ.get("RUBRIC_FAST_AUTOTUNE", "0") == "1"


def cache_file() -> Path:
    import triton

    root = Path(os.environ.get("RUBRIC_FAST_CACHE_DIR") or Path.home() / ".cache" / "rubric_fast")
    return root / f"tiles-triton{triton.__version__}.json"


def _key_text(key: tuple) -> str:
    return "|".join(str(k) for k in key)


def load_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _save(entries: dict) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only home: the choice still holds for this process
        pass


def ensure_tuned(dtype: torch.dtype, arch: int | None, h: int, v: int, measure) -> plan.TileConfig:
    """The tile for (dtype, arch, H, V): from memory, from the cache file, or by timing ``measure(tile) -> ms``
    over every candidate (a candidate that fails to launch is skipped)."""
    key = plan.tune_key(dtype, arch, h, v)
    if key in plan._TUNED:
        return plan._TUNED[key]
    cands = plan.tile_candidates(dtype, arch, h=h, v=v)
    entries = load_cache()
    saved = entries.get(_key_text(key))
    if saved is not None:
        tile = plan.TileConfig(*saved)
        if tile in cands:
            plan.set_tuned(dtype, arch, h, v, tile)
            return tile
    best, best_ms = cands[0], float("inf")
    if len(cands) > 1:
        for tile in cands:
            try:
                ms = float(measure(tile))
            except Exception:  # noqa: BLE001 - a candidate that cannot run here is not chosen
                continue
            if ms < best_ms:
                best, best_ms = tile, ms
        entries[_key_text(key)] = list(best.__dict__.values())
        _save(entries)
    plan.set_tuned(dtype, arch, h, v, best)
    return best
