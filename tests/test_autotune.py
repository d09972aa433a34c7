"""Autotuning of the logits tile: the choice by timing, remembered in memory and on disk, seen by the plan."""

from __future__ import annotations

import json

import pytest
import torch

from rubric_fast.kernels import autotune, plan


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    monkeypatch.setenv("RUBRIC_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(plan, "_TUNED", {})


def test_fastest_candidate_is_chosen_cached_and_used_by_the_plan(tmp_path):
    dt, arch, h, v = torch.bfloat16, 90, 2048, 151936
    cands = plan.tile_candidates(dt, arch, h=h, v=v)
    assert len(cands) == 4 and cands[0] == plan.default_tile(dt, arch, h=h, v=v)
    times = {c: 10.0 - i for i, c in enumerate(cands)}  # the last candidate is the fastest
    calls = []

    def measure(tile):
        calls.append(tile)
        if tile == cands[1]:
            raise RuntimeError("out of resources")  # a candidate that cannot run is skipped
        return times[tile]

    best = autotune.ensure_tuned(dt, arch, h, v, measure)
    assert best == cands[-1] and calls == cands
    assert plan.tile_config(dt, arch, h=h, v=v) == best
    assert plan.plan_fused(16384, h, v, dtype=dt, arch=arch).tile == best
    # other shapes keep the default
    assert plan.tile_config(dt, arch, h=h, v=v + 16) == plan.default_tile(dt, arch, h=h, v=v + 16)
    # a second process reads the file instead of timing again
    saved = json.loads(autotune.cache_file().read_text())
    assert list(saved.values()) == [list(best.__dict__.values())]
    plan._TUNED.clear()
    assert autotune.ensure_tuned(dt, arch, h, v, lambda t: pytest.fail("timed again")) == best


def test_nothing_to_tune_for_fp32_or_unaligned_rows():
    assert len(plan.tile_candidates(torch.float32, 90, h=2048, v=151936)) == 1
    assert len(plan.tile_candidates(torch.bfloat16, 90, h=2050, v=151936)) == 1
    tile = autotune.ensure_tuned(torch.float32, 90, 2048, 151936, lambda t: pytest.fail("nothing to time"))
    assert tile == plan.default_tile(torch.float32, 90, h=2048, v=151936)


def test_a_stale_cache_entry_is_ignored(tmp_path):
    dt, arch, h, v = torch.bfloat16, 90, 4096, 128256
    autotune.cache_file().parent.mkdir(parents=True, exist_ok=True)
    key = "|".join(str(k) for k in plan.tune_key(dt, arch, h, v))
    autotune.cache_file().write_text(json.dumps({key: [16, 16, 16, 1, 1, 1]}))  # not a candidate
    best = autotune.ensure_tuned(dt, arch, h, v, lambda t: 1.0 if t == plan.TILE_CANDIDATES_16BIT[2] else 2.0)
    assert best == plan.TILE_CANDIDATES_16BIT[2]
