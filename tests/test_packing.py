"""Padding-free update batches: sequences packed into one row with per-sequence position ids give the same
loss and gradients as the padded micro-batches (sdpa and eager on the CPU, Llama and Qwen2), and the
packer fills rows up to the token budget."""

from __future__ import annotations

import pytest
import torch

from rubric_fast.trainer import loop as L
from rubric_fast.trainer import batches as B, config as C, dist as D, update as U
from rubric_fast.trainer.command import DEFAULT_CONFIG
from rubric_fast.trainer.config import load_config
from rubric_fast.trainer.models import build_char_tokenizer, load_policy
from rubric_fast.trainer.rollout import Completion

SMALL = ["data.prompts_per_step=2", "rollout.num_generations=4", "model.tiny.hidden_size=32",
         "model.tiny.intermediate_size=48", "optimization.grad_clip=null", "algorithm.is_cap=2.0"]


def _samples(n: int = 12, seed: int = 0) -> list[B.Sample]:
    """Prompts of 5-14 and completions of 1-30 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(4, 90, (int(torch.randint(5, 15, (1,), generator=g)),), generator=g).tolist()
        c_len = int(torch.randint(1, 31, (1,), generator=g))
        c = torch.randint(4, 90, (c_len,), generator=g).tolist()
        slp = (-torch.rand(c_len, generator=g) * 3 - 1).tolist()
        out.append(B.Sample(i // 4, None, p, Completion(p, c, slp, i % 3 != 0, ""), 0, reward=float(i % 2),
                            advantage=float(torch.randn(1, generator=g))))
    return out


def _padding_share(samples, budget):
    mbs = B.pack_micro_batches(samples, budget)
    padded = sum(len(mb) * max(len(s.prompt_ids) + len(s.completion.token_ids) for s in mb) for mb in mbs)
    real = sum(len(s.prompt_ids) + len(s.completion.token_ids) for s in samples)
    return 1 - real / padded


def _loss_and_grads(model, cfg, samples, packed: bool, budget: int):
    mbs = [B.collate_packed(mb, "cpu", mask_truncated=True, seq_offset=100 * k) if packed else
           B.collate(mb, 0, "cpu", mask_truncated=True, seq_offset=100 * k)
           for k, mb in enumerate(B.pack_micro_batches(samples, budget, packed=packed))]
    n_tok = sum(float(mb.loss_weight.sum()) for mb in mbs)
    lcfg = C.policy_loss_config(cfg, normalizer=n_tok)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for mb in mbs:
        h, w, b = U.token_hidden(model, mb)
        old = L.ops.linear_logprob_entropy(h.detach(), w.detach(), mb.targets, return_entropy=False)[0]
        isw = L.ops.truncated_importance_weight(old, mb.sampler_logp, 2.0)
        loss, *_ = L.ops.fused_linear_policy_loss(h, w, mb.targets, old, mb.advantages, mb.loss_weight,
                                                  is_weight=isw, seq_index=mb.seq_index, config=lcfg, bias=b)
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads, len(mbs)


@pytest.mark.parametrize("arch,attn,aggregation", [
    ("llama", "sdpa", "token_mean"),
    ("qwen2", "sdpa", "seq_mean_token_mean"),
    ("llama", "eager", "seq_mean_token_sum"),
])
def test_packed_loss_and_gradients_equal_padded(arch, attn, aggregation):
    cfg = load_config(DEFAULT_CONFIG, SMALL + [f"model.tiny.arch={arch}", f"model.attn_implementation={attn}",
                                               "model.tiny.tie_word_embeddings=false",
                                               f"algorithm.policy_loss.aggregation={aggregation}"])
    torch.manual_seed(0)
    model = load_policy(cfg.model, build_char_tokenizer(), torch.device("cpu"))
    samples = _samples()
    assert _padding_share(samples, 160) > 0.1  # the padded micro-batches do carry padding
    loss_pad, g_pad, n_pad = _loss_and_grads(model, cfg, samples, packed=False, budget=160)
    loss_pack, g_pack, n_pack = _loss_and_grads(model, cfg, samples, packed=True, budget=160)
    assert n_pack < n_pad  # the same budget holds more real tokens per micro-batch
    assert abs(loss_pack - loss_pad) <= 1e-5 * max(1.0, abs(loss_pad))
    assert g_pad.keys() == g_pack.keys()
    for n, g in g_pad.items():
        torch.testing.assert_close(g_pack[n], g, atol=2e-6, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    # the oracle can tell: the same row without per-sequence positions (one long sequence) differs
    mb = B.collate_packed(samples[:3], "cpu", mask_truncated=False, seq_offset=0)
    h_packed = U.token_hidden(model, mb)[0]
    mb.position_ids = torch.arange(mb.input_ids.shape[1])[None]
    assert not torch.allclose(U.token_hidden(model, mb)[0], h_packed, atol=1e-3)


def test_update_step_is_the_same_packed_or_padded():
    """The loop's own update: one optimizer step (SGD, lr 1: the weight change is the gradient)."""
    results = []
    for padding_free in ("false", "true"):
        cfg = load_config(DEFAULT_CONFIG, SMALL + [f"optimization.padding_free={padding_free}",
                                                   "optimization.tokens_per_micro_batch=150"])
        torch.manual_seed(0)
        model = D.PolicyForward(load_policy(cfg.model, build_char_tokenizer(), torch.device("cpu")))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        out = U.update(cfg, model, None, opt, sched, _samples(seed=3), 0, "cpu")
        assert out["updates"] == 1 and not out["nonfinite"]
        assert B.padding_free(cfg) is (padding_free == "true")
        results.append((out, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (o_pad, w_pad), (o_pack, w_pack) = results
    assert o_pad["tokens"] == o_pack["tokens"]  # real tokens: padding never counted
    assert abs(o_pad["loss"] - o_pack["loss"]) <= 1e-5 * max(1.0, abs(o_pad["loss"]))
    for n, w in w_pad.items():
        torch.testing.assert_close(w_pack[n], w, atol=2e-6, rtol=1e-4)


def test_packed_micro_batches_fill_the_budget():
    samples = _samples(40, seed=7)
    lens = {id(s): len(s.prompt_ids) + len(s.completion.token_ids) for s in samples}
    rows = B.pack_micro_batches(samples, 100, packed=True)
    assert sorted(id(s) for r in rows for s in r) == sorted(id(s) for s in samples)  # each exactly once
    used = [sum(lens[id(s)] for s in r) for r in rows]
    assert all(u <= 100 for u in used)
    # first-fit decreasing: no two rows could be merged, and the row count is near the lower bound
    assert all(a + b > 100 for i, a in enumerate(used) for b in used[i + 1:])
    assert len(rows) <= -(-sum(used) // 100) + 1
    big = B.Sample(0, None, [5] * 80, Completion([], [6] * 40, [0.0] * 40, True, ""), 0)
    rows = B.pack_micro_batches([big] + samples[:3], 100, packed=True)
    assert [big] in rows  # over the budget: alone, never split
    mb = B.collate_packed(samples[:3], "cpu", mask_truncated=False, seq_offset=0)
    assert mb.attention_mask is None and mb.n_tokens == mb.input_ids.shape[1] == sum(lens[id(s)] for s in samples[:3])
    starts = (mb.position_ids[0] == 0).nonzero().flatten().tolist()
    assert starts == [0, lens[id(samples[0])], lens[id(samples[0])] + lens[id(samples[1])]]


def test_padding_free_auto_packs_only_with_varlen_attention():
    auto = load_config(DEFAULT_CONFIG, SMALL + ["model.attn_implementation=sdpa"])
    assert auto.optimization.padding_free == "auto" and not B.padding_free(auto)
    flash = load_config(DEFAULT_CONFIG, SMALL + ["model.attn_implementation=flash_attention_2"])
    assert B.padding_free(flash)
    with pytest.raises(Exception, match="optimization.padding_free: got 'maybe'; accepted: auto, true, false"):
        load_config(DEFAULT_CONFIG, SMALL + ["optimization.padding_free=maybe"])
