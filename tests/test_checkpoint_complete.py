"""resume=auto picks the newest complete checkpoint; an incomplete one is skipped, or refused when named."""

from __future__ import annotations

import pytest

from rubric_fast.trainer.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)


def test_incomplete_checkpoints_are_skipped_or_refused(tmp_path, capsys):
    d = tmp_path / "ck"
    for step in (1, 2):
        save_checkpoint(d, step, {"step": step}, rank_state={"rng": step}, keep_last=5)
    assert [p.name for p in list_checkpoints(d)] == ["step_00000001", "step_00000002"]
    (d / "step_00000003.tmp").mkdir()                      # killed while writing
    (d / "step_00000002" / "rank_00000.pt").unlink()       # a rank's file lost (partial copy)
    assert resolve_resume("auto", d).name == "step_00000001"
    err = capsys.readouterr().err
    assert "step_00000002" in err and "rank_00000.pt" in err and "step_00000003.tmp" in err
    with pytest.raises(CheckpointError, match="missing rank_00000.pt"):
        resolve_resume(str(d / "step_00000002"), d)
    with pytest.raises(CheckpointError, match="not finished"):
        resolve_resume(str(d / "step_00000003.tmp"), d)
    assert resolve_resume("never", d) is None
    with pytest.raises(CheckpointError, match="written by 1 ranks, this run has 2"):
        load_checkpoint(d / "step_00000001", rank=0, world_size=2)
    state, rank_state = load_checkpoint(d / "step_00000001")
    assert state == {"step": 1} and rank_state == {"rng": 1}


def test_keep_last(tmp_path):
    d = tmp_path / "ck"
    for step in range(1, 5):
        save_checkpoint(d, step, {"step": step}, rank_state={}, keep_last=2)
    assert [p.name for p in d.iterdir()] and [p.name for p in list_checkpoints(d)] == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in d.iterdir()) == ["step_00000003", "step_00000004"]
