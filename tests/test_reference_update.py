"""Dynamic KL reference (T1): interval copy and EMA, by hand, in the loop, across a resume and under fsdp2."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from methods_helpers import run  # noqa: E402

from rubric_fast.trainer.config import AlgorithmConfig, ConfigError, load_config  # noqa: E402
from rubric_fast.reference.types import PolicyLossConfig  # noqa: E402
from rubric_fast.trainer.reference_update import is_due, update_reference  # noqa: E402
from procs import free_port, init_gloo  # noqa: E402


def test_copy_and_ema_by_hand():
    pol, ref = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        pol.weight.copy_(torch.tensor([[1.0, 2.0]]))
        pol.bias.fill_(4.0)
        ref.weight.copy_(torch.tensor([[3.0, -2.0]]))
        ref.bias.fill_(0.0)
    r = copy.deepcopy(ref)
    update_reference(r, pol, ema=0.75)
    assert r.weight.tolist() == [[0.75 * 3 + 0.25 * 1, 0.75 * -2 + 0.25 * 2]] and r.bias.item() == 1.0
    update_reference(r, pol, ema=None)
    assert r.weight.tolist() == [[1.0, 2.0]] and r.bias.item() == 4.0


def test_schedule():
    a = AlgorithmConfig(policy_loss=PolicyLossConfig(beta=0.1), ref_update_interval=3)
    assert [s for s in range(1, 10) if is_due(a, s)] == [3, 6, 9]
    a = AlgorithmConfig(policy_loss=PolicyLossConfig(beta=0.1), ref_ema=0.9)
    assert all(is_due(a, s) for s in range(1, 5))
    assert not any(is_due(AlgorithmConfig(policy_loss=PolicyLossConfig(beta=0.1)), s) for s in range(1, 5))


def test_bad_combinations_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"^algorithm.ref_update_interval: a dynamic reference needs the KL term"):
        load_config(None, ["algorithm.ref_update_interval=5"])
    with pytest.raises(ConfigError, match=r"^algorithm.ref_ema: got 1.0"):
        load_config(None, ["algorithm.policy_loss.beta=0.1", "algorithm.ref_ema=1.0"])
    with pytest.raises(ConfigError, match=r"^algorithm.reference: a dynamic reference .* needs reference=copy"):
        load_config(None, ["algorithm.policy_loss.beta=0.1", "algorithm.ref_ema=0.9", "model.lora.enabled=true"])
    load_config(None, ["algorithm.policy_loss.beta=0.1", "algorithm.ref_ema=0.9", "model.lora.enabled=true",
                       "algorithm.reference=copy"])


KL = ["algorithm.policy_loss.beta=0.5", "algorithm.policy_loss.kl=k3", "algorithm.drop_zero_variance_groups=false", "rollout.overlap=false",
      "optimization.lr=3e-2"]


def test_a_copied_reference_has_zero_kl_at_the_next_step(tmp_path):
    # step 2's loss is computed (one mini-batch) before step 2's update: the policy then equals the reference
    # copied after step 1, so KL = 0 exactly; with a static reference it is > 0
    _, fixed = run(tmp_path, *KL, "max_steps=2", name="fixed")
    _, moved = run(tmp_path, *KL, "max_steps=2", "algorithm.ref_update_interval=1", name="moved")
    _, ema = run(tmp_path, *KL, "max_steps=2", "algorithm.ref_ema=0.5", name="ema")
    assert fixed[1]["kl"] > 1e-6
    assert moved[1]["kl"] == pytest.approx(0.0, abs=1e-7) and moved[1]["ref_updates"] == 2
    assert 1e-9 < ema[1]["kl"] < fixed[1]["kl"]


def test_resume_restores_the_moved_reference(tmp_path, monkeypatch):
    from rubric_fast.trainer import loop as L

    common = [*KL, "algorithm.ref_ema=0.5", "checkpoint.every=1", "checkpoint.resume=auto", "max_steps=4"]
    _, straight = run(tmp_path / "a", *common)
    real_save = L.save_checkpoint

    def save_then_die(d, step, bundle, **kw):
        assert "reference" in bundle
        real_save(d, step, bundle, **kw)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(L, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", *common)
    monkeypatch.setattr(L, "save_checkpoint", real_save)
    _, resumed = run(tmp_path / "b", *common)
    assert [r["kl"] for r in resumed[-2:]] == [r["kl"] for r in straight[-2:]]
    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    for k in a["reference"]:
        torch.testing.assert_close(a["reference"][k], b["reference"][k], rtol=0, atol=0, msg=k)


def _fsdp2_worker(rank: int, world: int, port: int, out: str) -> None:
    from rubric_fast.trainer.command import DEFAULT_CONFIG
    from rubric_fast.trainer.dist import PolicyForward, full_tensor, shard_fsdp2
    from rubric_fast.trainer.models import ReferencePolicy, build_char_tokenizer, load_policy

    init_gloo(rank, world, port)
    try:
        cfg = load_config(DEFAULT_CONFIG, ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=48"])
        torch.manual_seed(0)
        policy = load_policy(cfg.model, build_char_tokenizer(), torch.device("cpu"))
        reference = ReferencePolicy(policy, "copy", False)  # built before sharding, as the loop does
        model = PolicyForward(policy)
        shard_fsdp2(model, param_dtype=None, reduce_dtype="float32")
        with torch.no_grad():  # a different "trained" policy on every shard
            for p in model.parameters():
                p.add_(torch.full_like(p, 0.5))
        update_reference(reference.module(), policy, ema=0.5)
        full = {n: full_tensor(p.detach()) for n, p in policy.named_parameters()}
        torch.save({"ref": {n: p.clone() for n, p in reference.module().named_parameters()}, "policy": full},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_reference_update_gathers_the_shards(tmp_path):
    port = free_port()
    mp.start_processes(_fsdp2_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for n, full in r0["policy"].items():
        # ref = 0.5 * initial + 0.5 * (initial + 0.5) = full policy - 0.25, identical on both ranks
        torch.testing.assert_close(r0["ref"][n], full - 0.25, msg=n)
        torch.testing.assert_close(r0["ref"][n], r1["ref"][n], rtol=0, atol=0, msg=n)
