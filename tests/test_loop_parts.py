"""The train loop's parts: the train state and the rollouts save and restore themselves, callbacks see the
run's events in order, the test hooks are callbacks, and no function grows past about 120 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rubric_fast.trainer.callbacks import KillAt, ParamChecksum, from_environment
from rubric_fast.trainer.command import DEFAULT_CONFIG
from rubric_fast.trainer.config import load_config
from rubric_fast.trainer.loop import train
from rubric_fast.trainer.state import TrainState

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["data.prompts_per_step=2", "rollout.num_generations=2", "rollout.max_new_tokens=4",
         "logging.tensorboard=false", "logging.progress=false", "model.tiny.hidden_size=32",
         "model.tiny.intermediate_size=48"]


def test_train_state_round_trip():
    st = TrainState()
    st.step, st.policy_version, st.consecutive_nan = 7, 6, 1
    st.count("stale_dropped", 3)
    st.count("ref_updates")
    st.rewards += [0.25, float("nan")]
    again = TrainState()
    again.load_state_dict(st.state_dict())
    assert (again.step, again.policy_version, again.consecutive_nan) == (7, 6, 1)
    assert again.counters == {"stale_dropped": 3, "nan_steps": 0, "ref_updates": 1}
    assert again.rewards[0] == 0.25 and again.rewards[1] != again.rewards[1]
    d = st.state_dict()
    d["counters"]["nan_steps"] = 99  # a copy: the saved dict does not alias the live state
    assert st.counters["nan_steps"] == 0


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, int]] = []

    def on_event(self, event, step, rank, **info):
        self.events.append((event, step))
        if event == "train_end":
            assert "policy" in info and rank == 0


def test_callbacks_see_the_run_in_order(tmp_path):
    rec = Recorder()
    cfg = load_config(DEFAULT_CONFIG, SMALL + ["max_steps=2", "checkpoint.every=1", "rollout.overlap=false",
                                               "algorithm.drop_zero_variance_groups=false",
                                               f"logging.run_dir={tmp_path / 'run'}"])
    result = train(cfg, callbacks=[rec])
    assert result.steps == 2
    names = [e for e, _ in rec.events]
    # each step: completions generated, the update's first backward, the checkpoint; then the end
    assert names[-1] == "train_end" and rec.events[-1][1] == 2
    for step in (1, 2):
        mine = [e for e, s in rec.events if s == step and e != "train_end"]
        assert mine[0] == "rollout" and "backward" in mine and mine[-1] == "checkpoint", rec.events
        assert names.index("rollout") < names.index("backward")


def test_rollouts_state_resumes_the_stream(tmp_path):
    """The rollouts' saved state (stream position, group counter, the batch generated ahead) resumes the same
    prompts and group ids: a run killed in step 2 continues as the uninterrupted run."""
    import torch

    common = SMALL + ["max_steps=3", "checkpoint.every=1", "checkpoint.resume=auto", "rollout.overlap=true"]
    straight = train(load_config(DEFAULT_CONFIG, common + [f"logging.run_dir={tmp_path / 'a'}"]))

    class DieInStep2:
        def on_event(self, event, step, rank, **info):
            if event == "rollout" and step == 3:  # step 2 generates step 3's batch ahead: die there
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(DEFAULT_CONFIG, common + [f"logging.run_dir={tmp_path / 'b'}"]), callbacks=[DieInStep2()])
    ck = torch.load(tmp_path / "b" / "checkpoints" / "step_00000001" / "rank_00000.pt", weights_only=True)
    # after step 1: step 2's batch was generated ahead and is saved as it is, to be graded again on resume
    assert ck["next_rollout_step"] == 2 and len(ck["pending"]) == 1 and ck["group_counter"] == 4
    resumed = train(load_config(DEFAULT_CONFIG, common + [f"logging.run_dir={tmp_path / 'b'}"]))
    assert resumed.rewards == straight.rewards and resumed.steps == 3


def test_test_hooks_are_callbacks(monkeypatch):
    monkeypatch.delenv("RUBRIC_FAST_TEST_KILL", raising=False)
    monkeypatch.delenv("RUBRIC_FAST_DUMP_PARAM_SUM", raising=False)
    assert from_environment() == []
    monkeypatch.setenv("RUBRIC_FAST_TEST_KILL", "backward:2:1")
    monkeypatch.setenv("RUBRIC_FAST_DUMP_PARAM_SUM", "1")
    hooks = from_environment()
    assert isinstance(hooks[0], KillAt) and (hooks[0].phase, hooks[0].step, hooks[0].rank) == ("backward", 2, 1)
    assert isinstance(hooks[1], ParamChecksum)
    hooks[0].on_event("backward", 2, 0)  # another rank: nothing happens
    hooks[0].on_event("rollout", 2, 1)   # another phase: nothing happens
    with pytest.raises(ValueError, match="RUBRIC_FAST_TEST_KILL: expected PHASE:STEP"):
        KillAt.parse("backward")


def test_no_function_over_120_lines():
    """The trainer's (the issue that split the loop) and, since, the whole package's."""
    long = []
    for path in sorted((ROOT / "rubric_fast").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 120:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
