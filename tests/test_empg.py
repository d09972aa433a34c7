"""EMPG: entropy-modulated per-step advantages, by hand, and reaching the fused loss op token by token."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from methods_helpers import per_sequence, run, scripted_engine, spy_fused_loss  # noqa: E402

from rubric_fast.trainer import empg  # noqa: E402
from rubric_fast.trainer.config import ConfigError, load_config  # noqa: E402
from rubric_fast.trainer.empg import EMPGConfig, empg_step_advantages, token_advantages, turn_entropies  # noqa: E402


def test_modulated_advantages_by_hand():
    # steps: trajectory 0 has H = 0.2 then 1.0, trajectory 1 one step with H = 0.6
    # min-max: H~ = [0, 1], [0.5]; k = 1: exp(-H~) = [1, e^-1], [e^-.5]; mean m = (1 + e^-1 + e^-.5) / 3
    got = empg_step_advantages([1.0, -0.5], [[0.2, 1.0], [0.6]], EMPGConfig(enabled=True))
    m = (1 + math.exp(-1) + math.exp(-0.5)) / 3
    want = [[1 / m * 1.0 + 0.1 * math.exp(-1.0), math.exp(-1) / m * 1.0],   # bonus from the next step's H~ = 1
            [math.exp(-0.5) / m * -0.5]]                                    # last step: no bonus
    assert got[0] == pytest.approx(want[0]) and got[1] == pytest.approx(want[1])
    # confident steps are amplified, uncertain ones attenuated; g averages to 1 over the batch
    assert got[0][0] > 1.0 > got[0][1]
    # equal entropies everywhere: H~ = 0, g = 1, bonus zeta
    assert empg_step_advantages([2.0], [[0.7, 0.7]], EMPGConfig(zeta=0.3)) == [[2.3, 2.0]]


def test_token_layout_and_turn_entropy():
    assert token_advantages([0.5, -1.0], [[0, 2], [4, 5]], 6) == [0.5, 0.5, 0.0, 0.0, -1.0, 0.0]
    assert turn_entropies([1.0, 3.0, 9.0, 9.0, 4.0], [[0, 2], [4, 5]]) == [2.0, 4.0]


def test_empg_needs_multiturn_rollouts():
    with pytest.raises(ConfigError, match=r"^algorithm.empg.enabled: EMPG modulates the advantage per step"):
        load_config(None, ["algorithm.empg.enabled=true"])
    with pytest.raises(ConfigError, match=r"^algorithm.empg.zeta: got -0.1"):
        load_config(None, ["algorithm.empg.zeta=-0.1"])


def test_per_token_advantages_reach_the_fused_loss_unchanged(tmp_path, monkeypatch):
    texts = ["we see the sea.", "WE SEE", "we see thee", "see me.", "WE SEE", "we see the sea.", "a cat.", "we see"]
    scripted_engine(monkeypatch, texts)
    calls = spy_fused_loss(monkeypatch)
    seen = {}
    real = empg.rollout_turn_entropies

    def check_entropies(model, samples, pad_id, device, *, temperature, token_budget):
        real(model, samples, pad_id, device, temperature=temperature, token_budget=token_budget)
        # oracle: the entropy of softmax(logits / T) from the materialized logits of the same policy
        policy = model.policy
        policy.eval()
        with torch.no_grad():
            for s in samples:
                c = s.completion
                ids = torch.tensor([s.prompt_ids + c.token_ids])
                logits = policy(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1].double() / temperature
                ent = (-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)).tolist()
                assert c.turn_entropy == pytest.approx(turn_entropies(ent, c.turn_spans), abs=1e-4)
        policy.train()
        seen["samples"] = samples

    monkeypatch.setattr(empg, "rollout_turn_entropies", check_entropies)
    _, rows = run(tmp_path, "rollout.multiturn.enabled=true", "rollout.multiturn.max_turns=2",
                  "rollout.multiturn.env_args={followups: [Another one.]}", "data.prompts_per_step=1",
                  "data.shuffle=false", "algorithm.empg.enabled=true", "algorithm.empg.zeta=0.2",
                  "algorithm.empg.k=2.0", "optimization.tokens_per_micro_batch=100000",
                  "algorithm.drop_zero_variance_groups=false")
    samples = seen["samples"]
    # the hand formula over the batch's steps
    hs = [h for s in samples for h in s.completion.turn_entropy]
    lo, hi = min(hs), max(hs)
    n = lambda h: (h - lo) / (hi - lo)
    mean = sum(math.exp(-2.0 * n(h)) for h in hs) / len(hs)
    (call,) = calls
    assert call["advantages"].dtype == torch.float32 and call["advantages"].shape == call["targets"].shape
    got = per_sequence(call)
    weights = per_sequence(call, "loss_weight")
    by_len = {}
    for s in samples:
        H = s.completion.turn_entropy
        A = [math.exp(-2.0 * n(H[t])) / mean * s.advantage + (0.2 * math.exp(-n(H[t + 1])) if t + 1 < len(H) else 0)
             for t in range(len(H))]
        want = [0.0] * len(s.completion.token_ids)
        for a, (st, en) in zip(A, s.completion.turn_spans):
            want[st:en] = [a] * (en - st)
        by_len.setdefault(len(want), []).append(want)
    matched = 0
    for seq, vals in got.items():
        assert any(vals == pytest.approx(w, abs=1e-6) for w in by_len[len(vals)]), seq
        # environment tokens: weight 0; the assistant's tokens: their turn's advantage, not the trajectory's
        assert all(w == 0.0 for v, w in zip(vals, weights[seq]) if v == 0.0)
        matched += 1
    assert matched == 4 and len({round(v, 6) for v in call["advantages"].tolist()}) > 4
    assert rows[-1]["empg/step_entropy"] == pytest.approx(sum(hs) / len(hs), rel=1e-5)
