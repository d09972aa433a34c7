"""hidden_states_and_head: the fused ops on its output equal log_softmax of the model's own logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rubric_fast.integrations.hf import UnsupportedHeadError, check_linear_head, hidden_states_and_head
from rubric_fast.reference import linear_logprob_entropy

V, H = 61, 32


def _llama(tied: bool):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=tied)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _qwen2(tied: bool):
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=tied)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _check_matches_logits(model, with_bias=False):
    torch.manual_seed(1)
    if with_bias:  # a head with a bias (some models have one); the op must add it
        head = model.get_output_embeddings()
        head.bias = torch.nn.Parameter(torch.randn(V) * 0.5)
    ids = torch.randint(0, V, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on one row
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.double()
    for temperature in (1.0, 0.7):
        want = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        hidden, weight, bias = hidden_states_and_head(model, ids, mask, position_ids=pos)
        assert hidden.shape == (3, 9, H) and weight.shape == (V, H)
        targets = ids[:, 1:].reshape(-1)
        logp, ent, _ = linear_logprob_entropy(hidden[:, :-1].reshape(-1, H).double(), weight.double(), targets,
                                              bias=None if bias is None else bias.double(), temperature=temperature)
        real = mask[:, 1:].bool() & mask[:, :-1].bool()
        torch.testing.assert_close(logp.view(3, 8)[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("build", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_hidden_states_match_model_logits(build, tied):
    model = build(tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    _check_matches_logits(model)


def test_head_with_bias():
    _check_matches_logits(_llama(False), with_bias=True)


def test_gradient_reaches_tied_head():
    model = _llama(True)
    ids = torch.randint(0, V, (2, 6))
    hidden, weight, bias = hidden_states_and_head(model, ids, torch.ones_like(ids))
    logp, _, _ = linear_logprob_entropy(hidden[:, :-1].reshape(-1, H), weight, ids[:, 1:].reshape(-1))
    logp.sum().backward()
    emb = model.get_input_embeddings().weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    base = _llama(False)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    _check_matches_logits(model)
    with model.disable_adapter():
        _check_matches_logits(model)


def test_peft_on_lm_head_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(False), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(UnsupportedHeadError, match="lm_head"):
        check_linear_head(model)


def test_softcapped_head_refused():
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, intermediate_size=48,
                                    final_logit_softcapping=30.0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedHeadError, match="final_logit_softcapping=30.0"):
        hidden_states_and_head(model, torch.zeros(1, 3, dtype=torch.long))
    cfg.final_logit_softcapping = None  # Gemma without soft-capping is a plain linear head
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    _check_matches_logits(model)


def test_scaled_logits_refused():
    model = _llama(True)
    model.config.logit_scale = 0.125  # Cohere-style logit scaling
    with pytest.raises(UnsupportedHeadError, match="logit_scale"):
        check_linear_head(model)


def test_non_linear_head_refused():
    model = _llama(False)
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(H, V))
    with pytest.raises(UnsupportedHeadError, match="not torch.nn.Linear"):
        check_linear_head(model)
