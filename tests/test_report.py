import argparse
import json
import math

import pytest

from rubric_fast.trainer import report
from rubric_fast.trainer.logger import MetricsLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _make_run(run_dir, steps=12):
    with MetricsLogger(run_dir, is_main=True, tensorboard=False) as log:
        log.log_config({"model": "tiny<b>", "lr": 1e-6})
        for step in range(steps):
            log.log(step, {"reward": step / steps, "pass_rate/accuracy": 0.1 * (step % 5),
                           "pass_rate/safety": 0.9, "kl": 0.01 * step,
                           "entropy": float("nan") if step == 3 else 1.0 - 0.01 * step,
                           "clip_frac_low": 0.01, "clip_frac_high": 0.02, "loss": 0.5,
                           "tokens_per_s": 1000.0 + step, "judge/latency_p50": 0.4,
                           "judge/latency_p95": 1.5, "judge/error_rate": 0.02})
        log.log_samples(steps - 1, [
            {"prompt": "What is 2+2?", "response": "<script>alert('x')</script> & 4", "reward": 1.0,
             "verdicts": [{"criterion_id": "correct", "score": 1.0, "reason": "says <4>", "error": None}]},
            {"prompt": "p", "response": "r", "reward": None,
             "verdicts": [{"criterion_id": "correct", "score": None, "reason": "", "error": "judge timeout"}]},
        ])


def _args(run_dir, out=None, samples=20):
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    argv = [str(run_dir)] + (["--out", str(out)] if out else []) + ["--samples", str(samples)]
    return parser.parse_args(argv)


ALL_PLOTS = ["reward.png", "pass_rates.png", "kl.png", "entropy.png", "clip_frac.png", "loss.png",
             "tokens_per_s.png", "judge_latency.png", "judge_error_rate.png"]


def test_report_writes_pngs_and_index(tmp_path):
    run_dir = tmp_path / "run"
    _make_run(run_dir)
    assert report.run(_args(run_dir)) == 0
    out = run_dir / "report"
    for name in ALL_PLOTS:
        path = out / name
        assert path.is_file(), name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
    page = (out / "index.html").read_text()
    for name in ALL_PLOTS:
        assert f'src="{name}"' in page
    # every text from the run is escaped
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; 4" in page
    assert "says &lt;4&gt;" in page and "judge timeout" in page
    assert "model: tiny&lt;b&gt;" in page  # the config


def test_only_present_curves_are_plotted_and_out_dir_honoured(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "time": 0.0, "reward": 0.1 * s, "kl": None}) + "\n" for s in range(5)))
    out = tmp_path / "elsewhere"
    assert report.run(_args(run_dir, out=out)) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["reward.png"]  # kl is all null: no plot
    page = (out / "index.html").read_text()
    assert "No samples" in page and "No config.yaml" in page


def test_last_n_samples(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, is_main=True, tensorboard=False) as log:
        log.log(0, {"reward": 0.0})
        log.log_samples(0, [{"prompt": f"prompt-{i}-", "response": "r", "reward": 0.0, "verdicts": []}
                            for i in range(10)])
    assert report.run(_args(run_dir, samples=3)) == 0
    page = (run_dir / "report" / "index.html").read_text()
    assert [i for i in range(10) if f"prompt-{i}-" in page] == [7, 8, 9]


def test_missing_run_dir_names_it(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert report.run(_args(missing)) != 0
    assert str(missing) in capsys.readouterr().err


def test_missing_metrics_names_the_file(tmp_path):
    with pytest.raises(report.ReportError, match="metrics.jsonl"):
        report.write_report(tmp_path)


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "reward": 1.0}\n\n{"step": 1, "reward": \n{"step": 2}\n')
    with pytest.raises(report.ReportError, match=r"metrics\.jsonl:3: malformed JSON"):
        report.write_report(tmp_path)
    assert report.run(_args(tmp_path)) == 2
    assert f"{path}:3" in capsys.readouterr().err


def test_non_object_line_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(report.ReportError, match=r"metrics\.jsonl:2: expected a JSON object"):
        report.write_report(tmp_path)


def test_malformed_samples_line_names_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward": 1.0}\n')
    (tmp_path / "samples.jsonl").write_text('not json\n')
    with pytest.raises(report.ReportError, match=r"samples\.jsonl:1"):
        report.write_report(tmp_path)


def test_unterminated_last_line_of_a_running_job_is_skipped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward": 1.0}\n{"step": 1, "rew')
    index = report.write_report(tmp_path)
    assert (index.parent / "reward.png").is_file()


def test_rolling_mean_matches_direct_windows():
    values = [1.0, 2.0, 6.0, 3.0, 8.0, 0.5]
    got = report.rolling_mean(values, 3)
    want = [sum(values[max(0, i - 2):i + 1]) / len(values[max(0, i - 2):i + 1]) for i in range(len(values))]
    assert all(math.isclose(a, b) for a, b in zip(got, want))


def test_cli_wires_report(tmp_path):
    from rubric_fast.cli import main

    run_dir = tmp_path / "run"
    _make_run(run_dir, steps=3)
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report" / "index.html").is_file()


def test_curves_merge_by_step_later_wins_and_sort():
    records = [{"step": 0, "reward": 0.0}, {"step": 1, "reward": 1.0}, {"step": 2, "reward": 2.0},
               {"step": 1, "kl": 0.5},  # a second call for the same step
               {"step": 2, "reward": 20.0}, {"step": 3, "reward": None}]  # resumed run re-logs step 2
    data = report.curves(records)
    assert data["reward"] == ([0, 1, 2], [0.0, 1.0, 20.0])
    assert data["kl"] == ([1], [0.5])
