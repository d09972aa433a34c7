"""The hf rollout engine: left padding, EOS handling, and sampler log-probs of the processed distribution."""

from __future__ import annotations

import pytest
import torch

from rubric_fast.trainer.config import ModelConfig, TinyModelConfig
from rubric_fast.trainer.models import build_char_tokenizer, load_policy
from rubric_fast.trainer.rollout import HFRolloutEngine


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    model = load_policy(ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4,
                                                         intermediate_size=64)), tok, torch.device("cpu"))
    with torch.no_grad():  # a sharper-than-random policy, so top-p actually filters tokens
        model.get_output_embeddings().weight.mul_(8.0)
    return tok, model


def _prompts(tok):
    texts = ["Write a few words with the letter e.", "hi", "abc def"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _model_logprobs(model, prompt, tokens, temperature):
    """log_softmax(logits / T) at the sampled tokens from one unpadded forward of prompt + completion."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits / temperature, -1)
    pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(tokens))
    return lp[pos, torch.tensor(tokens)], lp[pos]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logp_is_model_logsoftmax_at_temperature(tiny, temperature):
    tok, model = tiny
    torch.manual_seed(3)
    eng = HFRolloutEngine(model, tok, max_new_tokens=12, temperature=temperature, top_p=1.0, batch_size=8)
    prompts = _prompts(tok) * 2
    comps = [c for batch in eng.generate(prompts) for c in batch]
    assert len(comps) == len(prompts)
    for p, c in zip(prompts, comps):
        assert c.prompt_ids == p
        assert len(c.token_ids) == len(c.sampler_logp) >= 1
        assert tok.pad_token_id not in c.token_ids[:-1]
        want, _ = _model_logprobs(model, p, c.token_ids, temperature)
        # left padding in the batch must not change the distribution of any row
        torch.testing.assert_close(torch.tensor(c.sampler_logp, dtype=torch.float64), want, atol=2e-4, rtol=1e-4)
    assert model.training  # the engine restores train mode


def test_top_p_sampler_logp_is_renormalised_nucleus(tiny):
    tok, model = tiny
    torch.manual_seed(4)
    top_p = 0.5
    eng = HFRolloutEngine(model, tok, max_new_tokens=10, temperature=1.0, top_p=top_p, batch_size=8)
    prompts = _prompts(tok)
    some_filtered = False
    for p, c in zip(prompts, [c for b in eng.generate(prompts) for c in b]):
        _, full = _model_logprobs(model, p, c.token_ids, 1.0)
        for j, t in enumerate(c.token_ids):
            probs = full[j].exp()
            order = probs.argsort(descending=True)
            cum = probs[order].cumsum(0)
            # HF keeps the smallest set whose mass reaches top_p (the token crossing it included)
            keep = order[: int((cum < top_p).sum()) + 1]
            assert t in keep.tolist()
            want = full[j, t] - torch.logsumexp(full[j, keep], 0)
            assert abs(c.sampler_logp[j] - float(want)) < 2e-4
            some_filtered |= keep.numel() < full.shape[1]
    assert some_filtered


def test_eos_ends_completion_and_is_kept(tiny):
    tok, model = tiny
    eos = tok.eos_token_id
    # force EOS as the 3rd token: a hook adds a huge logit to EOS after two generated tokens
    calls = {"n": 0}

    def hook(module, args, out):
        calls["n"] += 1
        if calls["n"] >= 3:
            out = out.clone()
            out[..., eos] += 1e4
        return out

    h = model.get_output_embeddings().register_forward_hook(hook)
    try:
        eng = HFRolloutEngine(model, tok, max_new_tokens=8, temperature=1.0, batch_size=4)
        comps = [c for b in eng.generate(_prompts(tok)) for c in b]
    finally:
        h.remove()
    for c in comps:
        assert c.finished and c.token_ids[-1] == eos and len(c.token_ids) == 3
        assert c.text == tok.decode(c.token_ids[:-1])
    eng = HFRolloutEngine(model, tok, max_new_tokens=4, temperature=1.0, batch_size=4)
    for c in [c for b in eng.generate(_prompts(tok)) for c in b]:
        assert (not c.finished and len(c.token_ids) == 4) or (c.finished and c.token_ids[-1] == eos)


def test_batches_are_yielded_in_prompt_order(tiny):
    tok, model = tiny
    eng = HFRolloutEngine(model, tok, max_new_tokens=3, batch_size=2)
    prompts = _prompts(tok) + _prompts(tok)[:2]
    batches = list(eng.generate(prompts))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [c.prompt_ids for b in batches for c in b] == prompts


def test_no_per_step_scores_and_no_warper_from_the_models_generation_config(tiny, monkeypatch):
    """generate is never asked for the [T, B, V] scores; warpers a model's generation_config carries
    (top_k, min_p) do not sneak in after the log-prob recorder: the recorded log-probs stay those of the
    configured distribution (here: the plain softmax at temperature 0.8)."""
    tok, model = tiny
    seen = []
    real = model.generate

    def spy(*args, **kw):
        seen.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(model, "generate", spy)
    monkeypatch.setattr(model.generation_config, "top_k", 2)
    monkeypatch.setattr(model.generation_config, "min_p", 0.5)
    torch.manual_seed(5)
    eng = HFRolloutEngine(model, tok, max_new_tokens=10, temperature=0.8, top_p=1.0, batch_size=8)
    prompts = _prompts(tok)
    comps = [c for b in eng.generate(prompts) for c in b]
    assert seen and all(not kw.get("output_scores") and not kw.get("output_logits") for kw in seen)
    distinct = set()
    for p, c in zip(prompts, comps):
        want, full = _model_logprobs(model, p, c.token_ids, 0.8)
        torch.testing.assert_close(torch.tensor(c.sampler_logp, dtype=torch.float64), want, atol=2e-4, rtol=1e-4)
        for j, t in enumerate(c.token_ids):
            distinct.add(int((full[j] > full[j, t]).sum()))  # rank of the drawn token
    assert max(distinct) >= 2  # tokens outside a top-2 were drawn: the model's top_k=2 was not applied
