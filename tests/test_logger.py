import json
import math
import sys

import pytest
import yaml

from rubric_fast.trainer.logger import MetricsLogger, progress_text


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_writes_jsonl_with_step_time_and_metrics(tmp_path):
    with MetricsLogger(tmp_path, is_main=True, tensorboard=False, progress_total=3) as log:
        log.log(1, {"reward": 0.25, "kl": 1e-3, "pass_rate/c1": 0.5})
        log.log(2, {"reward": 0.75, "entropy": 1.5})
        # flushed per line: readable before close
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    recs = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["reward"] == 0.25 and recs[0]["kl"] == 1e-3 and recs[0]["pass_rate/c1"] == 0.5
    assert recs[1]["entropy"] == 1.5 and "kl" not in recs[1]
    assert all(isinstance(r["time"], float) for r in recs)
    assert recs[0]["time"] <= recs[1]["time"]


def test_non_finite_values_become_null(tmp_path):
    torch = pytest.importorskip("torch")
    with MetricsLogger(tmp_path, is_main=True, tensorboard=True) as log:
        log.log(0, {"loss": float("nan"), "kl": float("inf"), "entropy": -math.inf,
                    "reward": torch.tensor(0.5), "tokens_per_s": torch.tensor(float("nan"))})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rec = json.loads(text)  # strict JSON
    assert rec["loss"] is None and rec["kl"] is None and rec["entropy"] is None
    assert rec["tokens_per_s"] is None and rec["reward"] == 0.5


def test_non_main_rank_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, is_main=False, tensorboard=True) as log:
        log.log_config({"lr": 1e-6})
        log.log(1, {"reward": 1.0})
        log.log_samples(1, [{"prompt": "p", "response": "r", "reward": 1.0, "verdicts": []}])
    assert not run_dir.exists()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_samples_and_config_written(tmp_path, capsys):
    cfg = {"model": "tiny", "optim": {"lr": 1e-6, "betas": (0.9, 0.99)}, "steps": 10}
    rows = [
        {"prompt": [{"role": "user", "content": "hi"}], "response": "hello", "reward": 0.5,
         "verdicts": [{"criterion_id": "c1", "score": 1.0, "reason": "ok", "error": None},
                      {"criterion_id": "c2", "score": None, "reason": "", "error": "timeout"}]},
        {"prompt": "q", "response": "a", "reward": None, "verdicts": []},
        {"prompt": "q", "response": "a", "reward": float("nan"), "verdicts": []},
    ]
    with MetricsLogger(tmp_path, is_main=True, tensorboard=True) as log:
        log.log_config(cfg)
        log.log_samples(7, rows)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {
        "model": "tiny", "optim": {"lr": 1e-6, "betas": [0.9, 0.99]}, "steps": 10}
    err = capsys.readouterr().err
    assert "model: tiny" in err and "lr: 1.0e-06" in err  # printed whole
    samples = _lines(tmp_path / "samples.jsonl")
    assert len(samples) == 3 and all(s["step"] == 7 for s in samples)
    assert samples[0]["prompt"] == [{"role": "user", "content": "hi"}]
    assert samples[0]["verdicts"][1] == {"criterion_id": "c2", "score": None, "reason": "", "error": "timeout"}
    assert samples[1]["reward"] is None and samples[2]["reward"] is None
    # TensorBoard got an event file with the scalars/text
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_verdict_dataclasses_accepted(tmp_path):
    from rubric_fast.judges.base import Verdict

    with MetricsLogger(tmp_path, is_main=True, tensorboard=False) as log:
        log.log_samples(1, [{"prompt": "p", "response": "r", "reward": 1.0,
                             "verdicts": [Verdict("c1", 1.0, "fine")]}])
    (s,) = _lines(tmp_path / "samples.jsonl")
    assert s["verdicts"] == [{"criterion_id": "c1", "score": 1.0, "reason": "fine", "error": None}]


def test_tensorboard_missing_is_one_info_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with MetricsLogger(tmp_path, is_main=True, tensorboard=True) as log:
        log.log(1, {"reward": 1.0})
    err = capsys.readouterr().err
    assert err.count("TensorBoard logging off") == 1
    assert not (tmp_path / "tb").exists()
    assert _lines(tmp_path / "metrics.jsonl")[0]["reward"] == 1.0


def test_progress_line_shows_the_training_signals(tmp_path, capsys):
    with MetricsLogger(tmp_path, is_main=True, tensorboard=False, progress_total=100) as log:
        log.log(5, {"reward": 0.5, "pass_rate/a": 0.2, "pass_rate/b": 0.4, "kl": 0.01, "entropy": 0.9,
                    "clip_frac_low": 0.01, "clip_frac_high": 0.02, "tokens_per_s": 1234.0,
                    "judge/latency_p50": 0.5, "judge/latency_p95": 2.0, "judge/error_rate": 0.05})
    err = capsys.readouterr().err  # stderr is not a tty under pytest: plain lines
    assert "step 5/100" in err
    for piece in ("reward 0.500", "pass 0.30 (2 crit)", "kl 0.01", "ent 0.9", "clip 0.010/0.020",
                  "1234 tok/s", "p50 0.50s", "p95 2.00s", "err 5.0%"):
        assert piece in err, piece


def test_progress_text_shows_guarded_counts_by_reason():
    text = progress_text({"reward": 0.5, "guarded": 3, "guarded/filler": 2, "guarded/prompt_echo": 1})
    assert "guarded 3 (filler 2, prompt_echo 1)" in text
    assert "guarded 0" in progress_text({"guarded": 0})


def test_progress_text_tolerates_missing_and_non_finite():
    assert progress_text({}) == ""
    assert progress_text({"reward": float("nan"), "kl": 0.5}) == "kl 0.5"


def test_close_is_idempotent_and_log_after_close_is_ignored(tmp_path):
    log = MetricsLogger(tmp_path, is_main=True, tensorboard=False)
    log.log(1, {"reward": 1.0})
    log.close()
    log.close()
    log.log(2, {"reward": 2.0})
    assert len(_lines(tmp_path / "metrics.jsonl")) == 1
