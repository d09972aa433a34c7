"""Honest ends: `score` exits non-zero when rows fail, prints each distinct error once and reports judged and
guarded rows apart; training stops after the first step whose judgements all failed; bad input is one line."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from judge_server import JudgeServer  # noqa: E402

from rubric_fast.cli import main  # noqa: E402
from rubric_fast.scoring import ScorerConfig, ScoringError, ScoringService  # noqa: E402
from rubric_fast.scoring.scorer import summarize_errors  # noqa: E402

LLM_RUBRICS = [{"id": "fruit", "prompt": "Name a fruit.", "criteria": [{"id": "apple", "text": "Mentions apple."}]},
               {"id": "tree", "prompt": "Name a tree.", "criteria": [{"id": "oak", "text": "Mentions oak."}]}]


def _closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def files(tmp_path):
    rubrics = tmp_path / "rubrics.jsonl"
    rubrics.write_text("\n".join(json.dumps(r) for r in LLM_RUBRICS) + "\n")

    def data(*responses):
        p = tmp_path / "data.jsonl"
        p.write_text("\n".join(json.dumps({"rubric_id": "fruit", "response": r}) for r in responses) + "\n")
        return p

    def judge(url: str):
        p = tmp_path / "judge.yaml"
        p.write_text(f"judge: {{type: http, model: m, endpoints: ['{url}'], retries: 0, timeout_s: 5}}\n"
                     "audit_rate: 0\n")
        return p
    return tmp_path, rubrics, data, judge


def test_score_with_an_unreachable_judge_fails_and_names_the_error_once(files, capsys):
    tmp, rubrics, data, judge = files
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    rc = main(["score", str(data("an apple", "a pear", "apples!", "Okay.")), "--rubrics", str(rubrics),
               "--judge", str(judge(url))])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "responses: 4  judged: 0  guarded: 1  failed: 3" in out
    assert "mean reward of judged responses: -" in out          # not the guarded row's 0
    assert "every response failed" not in err                   # the guarded row was judged (junk)
    assert "75% of the responses failed" in err
    assert err.count("ConnectError") == 1 and "3 x transport" in err


def test_score_every_row_failed_exits_1(files, capsys):
    tmp, rubrics, data, judge = files
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    rc = main(["score", str(data("an apple", "a pear")), "--rubrics", str(rubrics), "--judge", str(judge(url)),
               "--max-error-rate", "1"])
    assert rc == 1 and "every response failed" in capsys.readouterr().err


def test_score_max_error_rate(files, capsys):
    tmp, rubrics, data, judge = files
    with JudgeServer() as server:  # a response holding POISON always gets HTTP 500
        args = ["score", str(data("an apple", "a pear", "apple pie", "POISON apple")), "--rubrics", str(rubrics),
                "--judge", str(judge(server.url))]
        assert main(args) == 1                                   # default: any failure is an error
        out, err = capsys.readouterr()
        assert "responses: 4  judged: 3  guarded: 0  failed: 1" in out and "HTTP 500" in err
        assert main(args + ["--max-error-rate", "0.5"]) == 0
        out, _ = capsys.readouterr()
        assert "mean reward of judged responses: 0.6667" in out


@pytest.mark.parametrize("case", ["missing_data", "missing_rubrics", "out_unwritable", "judge_missing",
                                  "bad_judge_yaml", "llm_criterion_with_rule_judge", "bad_json_row"])
def test_score_bad_input_is_one_line_exit_2(files, capsys, case):
    tmp, rubrics, data, judge = files
    d = data("an apple")
    args = {"missing_data": [str(tmp / "nope.jsonl"), "--rubrics", str(rubrics)],
            "missing_rubrics": [str(d), "--rubrics", str(tmp / "nope_rubrics.jsonl")],
            "out_unwritable": [str(d), "--rubrics", str(rubrics), "--judge", str(judge("http://127.0.0.1:9/v1")),
                               "--out", str(tmp / "no_such_dir" / "out.jsonl")],
            "judge_missing": [str(d), "--rubrics", str(rubrics), "--judge", str(tmp / "nope.yaml")],
            "bad_judge_yaml": [str(d), "--rubrics", str(rubrics), "--judge", str(tmp / "bad.yaml")],
            "llm_criterion_with_rule_judge": [str(d), "--rubrics", str(rubrics), "--judge", "rule"],
            "bad_json_row": [str(tmp / "bad_row.jsonl"), "--rubrics", str(rubrics)]}[case]
    (tmp / "bad.yaml").write_text("judge: {type: http\n  model: [\n")
    (tmp / "bad_row.jsonl").write_text('{"rubric_id": "fruit", "response": "x"}\n{not json\n')
    rc = main(["score", *args])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("rubric-fast score: ")
    expect = {"missing_data": "DATA: no such file", "missing_rubrics": "--rubrics: no such file",
              "out_unwritable": "--out: cannot write", "judge_missing": "--judge:", "bad_judge_yaml": "bad.yaml:",
              "llm_criterion_with_rule_judge": "rubrics.jsonl:1: key 'criteria[0].verifier'",
              "bad_json_row": "bad_row.jsonl:2: invalid JSON"}[case]
    assert expect in lines[0]


def test_error_rate_stop_lists_each_distinct_error_once():
    class Broken:
        name, holistic = "broken", False

        async def grade(self, req):
            from rubric_fast.judges import Verdict
            return [Verdict(c.id, None, "", "server: HTTP 503 from http://judge:8000/v1") for c in req.criteria]

    from rubric_fast.rubric import Criterion, Rubric
    r = Rubric("r", [{"role": "user", "content": "q"}], [Criterion("a", "a"), Criterion("b", "b")])
    svc = ScoringService(Broken(), ScorerConfig(group_size=1, min_valid=1, error_min_samples=10, audit_rate=0))
    try:
        with pytest.raises(ScoringError) as info:
            for i in range(30):
                svc.submit(i, str(i), r, "apple")
            for _ in range(100):
                svc.ready_groups(timeout=0.05)
    finally:
        svc.close()
    msg = str(info.value)
    assert msg.count("HTTP 503") == 1 and " x server: HTTP 503" in msg and len(msg) < 400


def test_summarize_errors_counts_distinct_messages():
    assert summarize_errors(["a", "b", "a", None, "a"]) == "3 x a; b"
    assert summarize_errors([]) == "no error message"
    assert summarize_errors([str(i) for i in range(8)], limit=2).endswith("and 6 other distinct errors")


def test_training_stops_after_the_first_step_whose_judgements_all_failed(tmp_path, capsys):
    data = tmp_path / "llm.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in LLM_RUBRICS) + "\n")
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    rc = main(["train", "max_steps=3", "data.prompts_per_step=2", "rollout.num_generations=2",
               "rollout.max_new_tokens=4", "logging.tensorboard=false", "logging.progress=false",
               f"data.path={data}", f"logging.run_dir={tmp_path / 'run'}", "judge.type=http", "judge.model=m",
               f"judge.endpoints=[{url}]", "judge.retries=0", "judge.timeout_s=5", "scoring.guard=false"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "stopped: step 1: every judgement failed (4 rollouts on this rank)" in err
    assert err.count("ConnectError") == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or \
        (tmp_path / "run" / "metrics.jsonl").read_text() == ""  # no step was trained or logged
