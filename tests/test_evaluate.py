"""Held-out evaluation (trainer/evaluate.py): splits, the counts of one evaluation, eval.every in a training
run, the ``rubric-fast eval`` command, and the shipped SmolLM2 rubric dataset with its rule checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rubric_fast.judges.hf import HFJudge
from rubric_fast.judges.routing import RoutingJudge
from rubric_fast.judges.rule import RuleJudge
from rubric_fast.rubric import load_rubrics
from rubric_fast.rubric.rules import run_rule, validate_rule_params
from rubric_fast.rubric.schema import Criterion, Rubric
from rubric_fast.scoring import build_service
from rubric_fast.trainer.command import DEFAULT_CONFIG
from rubric_fast.trainer.config import EXAMPLES_DIR, ConfigError, load_config
from rubric_fast.trainer.evaluate import EvalResult, evaluate, select_split
from rubric_fast.trainer.loop import load_data, train
from rubric_fast.trainer.rewards import ServiceScorer
from rubric_fast.trainer.rollout import Completion

SMOLLM2_DATA = EXAMPLES_DIR / "rubrics" / "smollm2_rubrics.jsonl"


# ------------------------------------------------------------------------------------------------ splits
def test_select_split_and_data_split():
    rubrics = load_rubrics(SMOLLM2_DATA)
    train_, held = select_split(rubrics, "train", key="k"), select_split(rubrics, "held_out", key="k")
    assert (len(train_), len(held)) == (64, 32) and len(select_split(rubrics, "all", key="k")) == 96
    assert not {r.id for r in train_} & {r.id for r in held}
    with pytest.raises(ValueError, match=r"^--split: no prompt of x has meta\.split 'test' \(splits there: "
                                         r"held_out, train; use all"):
        select_split(rubrics, "test", key="--split", path="x")
    cfg = load_config(None, [f"data.path={SMOLLM2_DATA}", "data.split=train", "judge.type=hf",
                             "judge.model=unused"])
    assert [r.id for r in load_data(cfg)] == [r.id for r in train_]
    cfg.data.split = "nope"
    with pytest.raises(ConfigError, match=r"^data\.split: no prompt of .* has meta\.split 'nope'"):
        load_data(cfg)


def test_eval_config_is_checked():
    with pytest.raises(ConfigError, match=r"^override: eval\.num_generations: got 0"):
        load_config(DEFAULT_CONFIG, ["eval.num_generations=0"])
    with pytest.raises(ConfigError, match=r"eval\.temperature: got -1"):
        load_config(DEFAULT_CONFIG, ["eval.temperature=-1"])


# ------------------------------------------------------------------------------------------------ one evaluation
class ScriptedEngine:
    """Returns fixed responses in prompt order, in batches of 3 (as an engine streams them)."""

    def __init__(self, texts):
        self.texts = list(texts)

    def generate(self, prompts):
        comps = [Completion(p, [1] * (i + 1), [0.0] * (i + 1), i % 2 == 0, t)
                 for i, (p, t) in enumerate(zip(prompts, self.texts))]
        for i in range(0, len(comps), 3):
            yield comps[i:i + 3]


class CharTok:
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 50 for c in text]}


def _rule(cid, params, weight=1.0, **kw):
    return Criterion(cid, cid, weight, verifier="rule", verifier_params=params, **kw)


def test_evaluate_counts_rewards_pass_rates_and_failures():
    q = _rule("ends_q", {"check": "regex", "pattern": r"\?$"})
    short = _rule("short", {"check": "length", "max": 3, "unit": "words"})
    llm = Criterion("polite", "The reply is polite.")
    rules_only = Rubric("a", [{"role": "user", "content": "ask me"}], [q, short])
    with_llm = Rubric("b", [{"role": "user", "content": "reply to the customer"}], [short, llm])
    # the llm judge never answers in the format: its verdicts fail (counted apart, never 0)
    judge = RoutingJudge({"rule": RuleJudge(), "llm": HFJudge(generate_fn=lambda b: ["no json"] * len(b),
                                                              max_reasks=1)})
    scorer = ServiceScorer(build_service({"min_valid": 0, "max_error_rate": 1.0, "audit_rate": 0.0}, judge=judge), 2)
    texts = ["why?", "one two three four?",       # rubric a: reward 1.0, then 0.5 (ends_q met, short not)
             "Your refund is on its way", "Okay."]  # rubric b: the llm fails -> failed; "Okay." is junk -> guarded
    samples: list = []
    try:
        res = evaluate(ScriptedEngine(texts), CharTok(), scorer, [rules_only, with_llm], num_generations=2,
                       samples=samples)
    finally:
        scorer.close()
    assert (res.prompts, res.responses, res.scored, res.guarded, res.failed) == (2, 4, 3, 1, 1)
    assert res.mean_reward == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert res.criteria["ends_q"] == [2, 2, 0]
    assert res.criteria["short"] == [1, 4, 0]  # the guard's verdicts count as not met, as in training
    assert res.criteria["polite"] == [0, 1, 1]  # the failed judgement apart
    assert res.pass_rates()["ends_q"] == 1.0
    assert any(e.startswith("parse") for e in res.errors)
    m = res.to_metrics()
    assert m["eval/reward"] == pytest.approx(0.5) and m["eval/failed"] == 1.0 and m["eval/guarded"] == 1.0
    assert m["eval/truncated_frac"] == 0.5 and m["eval/completion_len"] == pytest.approx(2.5)
    assert [s["reward"] for s in samples][:2] == [1.0, 0.5] and samples[2]["reward"] is None
    # summed over ranks: the vector round trip keeps every count
    ids = sorted(res.criteria)
    back = EvalResult.from_vector(res.vector(ids), ids, 0.0, 0.0)
    assert back.as_dict()["criteria"] == res.as_dict()["criteria"] and back.mean_reward == res.mean_reward


# ------------------------------------------------------------------------------------------------ in training
def _train(tmp_path, name, *extra):
    run_dir = tmp_path / name
    cfg = load_config(DEFAULT_CONFIG, ["max_steps=4", "data.prompts_per_step=4", "rollout.num_generations=4",
                                       "logging.tensorboard=false", "logging.progress=false",
                                       "logging.samples_every=0", f"logging.run_dir={run_dir}",
                                       "checkpoint.save_final=true", *extra])
    result = train(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, rows, run_dir


def test_eval_every_logs_held_out_numbers_without_touching_training(tmp_path):
    base, base_rows, _ = _train(tmp_path, "plain")
    result, rows, run_dir = _train(tmp_path, "eval", "eval.every=2", "eval.split=all", "eval.num_generations=3",
                                   "eval.max_prompts=5")
    evals = {r["step"]: r for r in rows if "eval/reward" in r}
    assert sorted(evals) == [0, 2, 4]  # the start, every 2 steps, the end
    for r in evals.values():
        assert r["eval/responses"] == 15 and r["eval/scored"] + r["eval/failed"] == 15
        assert 0.0 <= r["eval/reward"] <= 1.0
        assert {k for k in r if k.startswith("eval/pass_rate/")} == {
            "eval/pass_rate/has_letter", "eval/pass_rate/ends_with_period", "eval/pass_rate/two_to_six_words",
            "eval/pass_rate/lowercase_only"}
    # the evaluation samples in a forked RNG: the training run is the same as without it
    assert result.rewards == base.rewards
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3, 4]
    # the report draws the held-out curve
    from rubric_fast.trainer.report import write_report

    write_report(run_dir)
    assert (run_dir / "report" / "eval.png").is_file()


def test_eval_command_on_a_run_dir(tmp_path):
    _, _, run_dir = _train(tmp_path, "r", "max_steps=2")
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "rubric_fast", "eval", str(run_dir), "--split", "all", "-G", "2",
           "--max-prompts", "3", "--out", str(out), "--samples", str(tmp_path / "s.jsonl")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    summary = json.loads(out.read_text())
    assert summary["responses"] == 6 and summary["prompts"] == 3 and summary["seed"] == 1234
    assert summary["judge"]["type"] == "rule" and summary["failed"] == 0
    assert set(summary["criteria"]) == {"has_letter", "ends_with_period", "two_to_six_words", "lowercase_only"}
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 6
    assert "mean reward:" in r.stdout and "step_" in summary["model"]
    # the same seed gives the same numbers
    r2 = subprocess.run(cmd[:-4] + ["--out", str(tmp_path / "e2.json")], capture_output=True, text=True,
                        timeout=300, check=False)
    assert r2.returncode == 0 and json.loads((tmp_path / "e2.json").read_text())["mean_reward"] == summary["mean_reward"]
    # bad input: one line naming the argument, exit 2
    bad = subprocess.run(cmd[:5] + ["--split", "nope"], capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "rubric-fast eval: --split: no prompt of")
    missing = subprocess.run([sys.executable, "-m", "rubric_fast", "eval", str(run_dir), "--rubrics",
                              str(tmp_path / "none.jsonl")], capture_output=True, text=True, timeout=300, check=False)
    assert missing.returncode == 2 and "--rubrics: no such file" in missing.stderr


# ------------------------------------------------------------------------------------------------ the dataset
def test_smollm2_dataset_mixes_rule_and_llm_criteria():
    rubrics = load_rubrics(SMOLLM2_DATA)
    families: dict[str, list] = {}
    for r in rubrics:
        families.setdefault(r.source["meta"]["family"], []).append(r)
        kinds = {c.verifier for c in r.criteria}
        assert kinds == {"rule", "llm"}, r.id
        assert r.aggregation.method == "weighted_mean"
    assert sorted(families) == ["fact", "json", "list", "reply", "word"]
    checks = {c.verifier_params.get("check") for r in rubrics for c in r.criteria if c.verifier == "rule"}
    assert checks == {"count", "length", "contains", "regex", "json"}
    pitfalls = {c.id for r in rubrics for c in r.criteria if c.polarity == "penalize_if_met"}
    assert pitfalls == {"numbered_list", "says_sorry"}
    llm_ids = {c.id for r in rubrics for c in r.criteria if c.verifier == "llm"}
    assert llm_ids == {"correct", "polite", "on_topic"}
    # held-out prompts cover every family
    held = select_split(rubrics, "held_out", key="k")
    assert {r.source["meta"]["family"] for r in held} == set(families)


def _verdict(rubric_id: str, cid: str, text: str) -> float | None:
    r = next(r for r in load_rubrics(SMOLLM2_DATA) if r.id == rubric_id)
    c = next(c for c in r.criteria if c.id == cid)
    return run_rule(text, c.verifier_params, r.reference_answer).score


@pytest.mark.parametrize("rubric_id, cid, text, met", [
    ("list-00", "three_bullets", "Here you go:\n- apple\n- pear\n- plum", 1.0),
    ("list-00", "three_bullets", "- apple\n- pear\n- plum\n- fig", 0.0),
    ("list-00", "three_bullets", "* apple\n* pear\n\u2022 plum", 1.0),
    ("list-00", "three_bullets", "1. apple\n2. pear\n3. plum", 0.0),
    ("list-00", "numbered_list", "1. apple\n2. pear\n3. plum", 1.0),
    ("list-00", "numbered_list", "- apple\n- pear\n- plum", 0.0),
    ("fact-00", "ends_with_question", "The Moon orbits Earth. Did you know that?", 1.0),
    ("fact-00", "ends_with_question", "Is it big? It is.", 0.0),
    ("fact-00", "ends_with_question", 'She asked "really?"', 1.0),
    ("json-00", "json_keys", '{"name": "banana", "color": "yellow"}', 1.0),
    ("json-00", "json_keys", '```json\n{"name": "banana", "color": "yellow"}\n```', 1.0),
    ("json-00", "json_keys", '{"name": "banana"}', 0.0),
    ("json-00", "json_keys", "name: banana, color: yellow", 0.0),
    ("word-00", "uses_word", "The capital of France is Paris.", 1.0),
    ("word-00", "uses_word", "It is Parisian.", 0.0),
    ("reply-00", "says_sorry", "We are so sorry for the delay.", 1.0),
    ("reply-00", "says_sorry", "Thank you for your patience.", 0.0),
    ("reply-00", "short", " ".join(["word"] * 40), 1.0),
    ("reply-00", "short", " ".join(["word"] * 41), 0.0),
])
def test_smollm2_rule_criteria(rubric_id, cid, text, met):
    assert _verdict(rubric_id, cid, text) == met


def test_count_check_is_validated():
    validate_rule_params({"check": "count", "pattern": "^-", "flags": "m", "min": 1})
    for bad, msg in (({"check": "count", "pattern": "^-"}, "needs 'min' and/or 'max'"),
                     ({"check": "count", "pattern": "(", "min": 1}, "invalid regex"),
                     ({"check": "count", "pattern": "x", "flags": "q", "min": 1}, "subset of 'imsx'"),
                     ({"check": "count", "pattern": "x", "min": -1}, "'min' must be an integer >= 0")):
        with pytest.raises(ValueError, match=msg):
            validate_rule_params(bad)


def test_dataset_file_is_what_the_generator_writes(tmp_path):
    """examples/rubrics/smollm2_rubrics.jsonl is generated by tools/make_smollm2_rubrics.py (deterministic)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import make_smollm2_rubrics as gen
    finally:
        sys.path.pop(0)
    want = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in gen.records())
    assert SMOLLM2_DATA.read_text(encoding="utf-8") == want
