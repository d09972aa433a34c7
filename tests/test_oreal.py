"""OREAL: positive / negative loss factors on the advantages, best and worst member per prompt."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from methods_helpers import run, scripted_engine, spy_fused_loss  # noqa: E402

from rubric_fast import ops  # noqa: E402
from rubric_fast.trainer.config import ConfigError, load_config  # noqa: E402
from rubric_fast.trainer.oreal import best_worst_keep, scale_advantages  # noqa: E402


def test_scale_advantages_by_sign():
    assert scale_advantages([1.5, -2.0, 0.0, -0.5], 1.0, 0.25) == [1.5, -0.5, 0.0, -0.125]
    assert scale_advantages([1.0, -1.0], 0.0, 2.0) == [0.0, -2.0]


def test_best_worst_keep_by_hand():
    #              group 0 ------------  group 1 ---------  group 2 (all equal)
    rewards = [0.5, 1.0, None, 1.0, 0.0, 0.2, 0.2, 0.9, 0.7, 0.7]
    groups = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert best_worst_keep(rewards, groups) == [False, True, False, False, True, True, False, True, True, False]


def test_factors_reach_the_fused_loss_as_advantages(tmp_path, monkeypatch):
    # rewards by the default rubric: 1.0, 0.5 (two of four), 0.75, 0.25
    texts = ["we see the sea.", "WE SEE.", "we see thee", "WE SEE"]
    rewards = torch.tensor([1.0, 0.5, 0.75, 0.25])
    base, _ = ops.group_advantages(rewards, torch.zeros(4, dtype=torch.long))
    scripted_engine(monkeypatch, texts)
    calls = spy_fused_loss(monkeypatch)
    _, rows = run(tmp_path, "data.prompts_per_step=1", "algorithm.positive_loss_factor=2.0",
                  "algorithm.negative_loss_factor=0.5", "optimization.tokens_per_micro_batch=100000")
    assert rows[-1]["reward"] == pytest.approx(0.625)
    (call,) = calls
    want = [2.0 * a if a > 0 else 0.5 * a for a in base.tolist()]
    got = {}
    for seq, adv in zip(call["seq_index"].tolist(), call["advantages"].tolist()):
        got.setdefault(seq, set()).add(round(adv, 5))
    assert sorted(v.pop() for v in got.values()) == pytest.approx(sorted(want), abs=1e-5)


def test_best_worst_only_trains_two_members_per_prompt(tmp_path, monkeypatch):
    texts = ["we see the sea.", "WE SEE.", "we see thee", "WE SEE"]
    scripted_engine(monkeypatch, texts)
    calls = spy_fused_loss(monkeypatch)
    _, rows = run(tmp_path, "data.prompts_per_step=1", "algorithm.best_worst_only=true",
                  "optimization.tokens_per_micro_batch=100000")
    assert rows[-1]["samples_trained"] == 2
    (call,) = calls
    n_seq = len(set(call["seq_index"].tolist()))
    assert n_seq == 2
    # the best (reward 1.0) has the largest advantage, the worst (0.25) the smallest: the GRPO values of
    # the whole group, not recomputed over the two kept members
    base, _ = ops.group_advantages(torch.tensor([1.0, 0.5, 0.75, 0.25]), torch.zeros(4, dtype=torch.long))
    assert sorted(set(round(x, 5) for x in call["advantages"].tolist())) == \
        pytest.approx(sorted([base[3].item(), base[0].item()]), abs=1e-5)


def test_bad_factors_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"^algorithm.negative_loss_factor: got -1.0"):
        load_config(None, ["algorithm.negative_loss_factor=-1"])
    with pytest.raises(ConfigError, match=r"^algorithm.positive_loss_factor: both loss factors are 0"):
        load_config(None, ["algorithm.negative_loss_factor=0", "algorithm.positive_loss_factor=0"])
