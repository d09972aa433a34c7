"""Run directories: one run per directory unless resumed or overwritten; a resume cuts the logs back to its
checkpoint; config.yaml only after validation; file-system and data errors are one line on the right key."""

from __future__ import annotations

import json

import pytest
import yaml

from rubric_fast.cli import main
from rubric_fast.rubric import RubricError, load_rubrics
from rubric_fast.trainer.rundir import cut_jsonl

SMALL = ["data.prompts_per_step=2", "rollout.num_generations=4", "rollout.max_new_tokens=6",
         "logging.tensorboard=false", "logging.progress=false", "logging.samples_every=1",
         "model.tiny.hidden_size=32", "model.tiny.intermediate_size=48", "optimization.lr=1e-2",
         "algorithm.drop_zero_variance_groups=false"]


def train(run_dir, *extra) -> int:
    return main(["train", *SMALL, f"logging.run_dir={run_dir}", *extra])


def steps(path) -> list[int]:
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()]


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("rubric-fast train:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_a_second_run_into_a_used_dir_is_refused_and_leaves_it_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "max_steps=2", "seed=0") == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert train(run, "max_steps=3", "seed=7") == 2
    line = one_line(capsys.readouterr().err)
    assert "logging.run_dir" in line and "already holds a run" in line and "checkpoint.resume=auto" in line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # config.yaml too
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 0


def test_overwrite_replaces_the_previous_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "max_steps=3", "checkpoint.every=1") == 0
    assert train(run, "max_steps=2", "logging.overwrite=true", "seed=3") == 0
    assert steps(run / "metrics.jsonl") == [1, 2] and steps(run / "samples.jsonl")[-1] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]  # the old 1..3 are gone
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 3


def test_resume_cuts_metrics_and_samples_back_to_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    # a checkpoint at step 2, then step 3 is logged and the run dies before another checkpoint
    assert train(run, "max_steps=3", "checkpoint.every=2", "checkpoint.save_final=false") == 0
    assert steps(run / "metrics.jsonl") == [1, 2, 3]
    capsys.readouterr()
    assert train(run, "max_steps=4", "checkpoint.resume=auto") == 0
    err = capsys.readouterr().err
    assert "dropped 1 rows after step 2" in err and "resumed from" in err
    assert steps(run / "metrics.jsonl") == [1, 2, 3, 4]             # step 3 once, from the resumed run
    assert steps(run / "samples.jsonl") == sorted(steps(run / "samples.jsonl"))
    # the closing summary covers the whole run, not the resumed part only: the rewards of steps 1-2 come
    # from the checkpoint (a finished run resumed at its end returns its whole history)
    from rubric_fast.trainer.command import DEFAULT_CONFIG
    from rubric_fast.trainer.config import load_config
    from rubric_fast.trainer.loop import train as train_api

    cfg = load_config(DEFAULT_CONFIG, SMALL + [f"logging.run_dir={run}", "max_steps=4", "checkpoint.resume=auto"])
    rewards = [json.loads(x)["reward"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert train_api(cfg).rewards == pytest.approx(rewards) and len(rewards) == 4


def test_resume_auto_without_a_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "max_steps=2", "checkpoint.save_final=false") == 0
    capsys.readouterr()
    assert train(run, "max_steps=1", "checkpoint.resume=auto") == 0
    assert "checkpoint.resume=auto: no checkpoint" in capsys.readouterr().err
    assert steps(run / "metrics.jsonl") == [1]


def test_config_yaml_is_written_only_after_validation(tmp_path, capsys):
    run = tmp_path / "run"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "criteria": [{"text": "x", "verifier": "contains", "weight": -1}]}\n')
    assert train(run, "max_steps=1", f"data.path={bad}") == 2
    assert not run.exists() or not any(run.iterdir())           # nothing written for a refused run
    assert train(run, "max_steps=2", "checkpoint.every=1") == 0
    before = (run / "config.yaml").read_text()
    assert train(run, "max_steps=3", "checkpoint.resume=auto", f"data.path={bad}") == 2
    assert (run / "config.yaml").read_text() == before
    assert train(run, "max_steps=3", "checkpoint.resume=auto", "judge.type=oracle") == 2
    assert (run / "config.yaml").read_text() == before and steps(run / "metrics.jsonl") == [1, 2]


@pytest.mark.parametrize("case", ["run_dir_under_a_file", "checkpoint_dir_under_a_file", "missing_data",
                                  "criterion_no_judge_can_grade", "empty_message_prompt"])
def test_errors_are_one_line_on_the_right_key(tmp_path, capsys, case):
    f = tmp_path / "a_file"
    f.write_text("x")
    llm = tmp_path / "llm.jsonl"
    llm.write_text(json.dumps({"prompt": "Name a fruit.", "criteria": [
        {"id": "ok", "text": "has a", "verifier": "contains", "verifier_params": {"text": "a"}},
        {"id": "kind", "text": "The response is kind."}]}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": [{"role": "user", "content": " "}], "criteria": [
        {"text": "has a", "verifier": "contains", "verifier_params": {"text": "a"}}]}) + "\n")
    extra, key = {
        "run_dir_under_a_file": ([f"logging.run_dir={f / 'run'}"], "logging.run_dir: cannot write"),
        "checkpoint_dir_under_a_file": ([f"checkpoint.dir={f / 'ck'}"], "checkpoint.dir: cannot write"),
        "missing_data": ([f"data.path={tmp_path / 'nope.jsonl'}"], "data.path: no such file"),
        "criterion_no_judge_can_grade": ([f"data.path={llm}"], "llm.jsonl:1: key 'criteria[1].verifier'"),
        "empty_message_prompt": ([f"data.path={empty}"], "empty.jsonl:1: key 'prompt[0].content'"),
    }[case]
    rc = main(["train", *SMALL, "max_steps=1", f"logging.run_dir={tmp_path / 'run'}", *extra])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and key in line, line
    if case == "criterion_no_judge_can_grade":
        assert "judge.type is 'rule'" in line and "http or hf" in line


def test_empty_message_prompts_are_refused_like_empty_strings(tmp_path):
    p = tmp_path / "r.jsonl"
    for prompt in ("", [{"role": "user", "content": ""}], [{"role": "system", "content": "be brief"},
                                                           {"role": "user", "content": "  "}]):
        p.write_text(json.dumps({"prompt": prompt, "criteria": [{"text": "t", "verifier": "contains",
                                                                 "verifier_params": {"text": "a"}}]}) + "\n")
        with pytest.raises(RubricError, match="r.jsonl:1: key 'prompt"):
            load_rubrics(p)


def test_cut_jsonl_keeps_rows_up_to_the_step(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 2, 3, 4)))
    assert cut_jsonl(p, 2) == 3 and steps(p) == [1, 2, 2]
    assert cut_jsonl(tmp_path / "absent.jsonl", 2) == 0


def test_non_finite_step_message_names_the_skipped_step(tmp_path, capsys, monkeypatch):
    from rubric_fast.trainer import loop as L

    real = L.ops.fused_linear_policy_loss
    monkeypatch.setattr(L.ops, "fused_linear_policy_loss", lambda *a, **k: (lambda out: (out[0] * float("nan"),
                                                                                       *out[1:]))(real(*a, **k)))
    assert train(tmp_path / "run", "max_steps=2", "max_nan_steps=5") == 0
    err = capsys.readouterr().err
    assert "step 1: non-finite loss" in err and "step 2: non-finite loss" in err and "step 0:" not in err
