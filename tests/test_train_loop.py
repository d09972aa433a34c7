"""One training step of every loss, estimator and aggregation; KL reference, LoRA, iterations, checkpoints."""

from __future__ import annotations

import json
import math

import re

import pytest
import torch

from rubric_fast.trainer.command import DEFAULT_CONFIG
from rubric_fast.trainer.config import load_config
from rubric_fast.trainer.loop import train
from rubric_fast.trainer.state import TrainingStopped
from rubric_fast.trainer.batches import pack_micro_batches
from rubric_fast.trainer.rollouts import scaffold_share

SMALL = ["max_steps=1", "data.prompts_per_step=2", "rollout.num_generations=4", "rollout.max_new_tokens=6",
         "logging.tensorboard=false", "logging.progress=false", "checkpoint.save_final=false",
         "model.tiny.hidden_size=32", "model.tiny.intermediate_size=48", "optimization.lr=1e-2"]


def run(tmp_path, *overrides):
    cfg = load_config(DEFAULT_CONFIG, SMALL + [f"logging.run_dir={tmp_path / 'run'}", *overrides])
    result = train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def _params(cfg_overrides, tmp_path):
    torch.manual_seed(0)
    return run(tmp_path, *cfg_overrides)


@pytest.mark.parametrize("overrides", [
    ["algorithm.policy_loss.loss=ppo_clip", "algorithm.policy_loss.eps_high=0.28", "algorithm.policy_loss.dual_clip=3.0", "algorithm.policy_loss.delta=2.0"],
    ["algorithm.policy_loss.loss=cispo", "algorithm.policy_loss.eps_high=4.0"],
    ["algorithm.policy_loss.loss=sapo"],
    ["algorithm.policy_loss.loss=gspo", "algorithm.policy_loss.eps_low=3e-4", "algorithm.policy_loss.eps_high=4e-4"],
    ["algorithm.estimator=grpo", "algorithm.scale=batch"],
    ["algorithm.estimator=dr_grpo", "algorithm.policy_loss.aggregation=constant"],
    ["algorithm.estimator=rloo"],
    ["algorithm.estimator=w_reinforce", "algorithm.drop_zero_variance_groups=false"],
    ["algorithm.estimator=canon"],
    ["algorithm.policy_loss.aggregation=seq_mean_token_mean"],
    ["algorithm.policy_loss.aggregation=seq_mean_token_sum"],
    ["algorithm.policy_loss.top_entropy_fraction=0.2", "algorithm.policy_loss.entropy_coef=0.01"],
    ["algorithm.num_iterations=2", "optimization.mini_batches=2", "optimization.tokens_per_micro_batch=40"],
    ["algorithm.policy_loss.beta=0.05", "algorithm.policy_loss.kl=k3", "max_steps=2"],
    ["model.lora.enabled=true", "algorithm.policy_loss.beta=0.05", "max_steps=2"],
    ["model.tiny.arch=qwen2", "model.tiny.tie_word_embeddings=false", "rollout.top_p=0.9"],
    ["algorithm.mask_truncated_completions=true", "rollout.overlap=false"],
    ["rollout.scaffold.enabled=true", "max_steps=2"],
], ids=lambda o: ",".join(x.split("=")[0].split(".")[-1] + "=" + x.split("=")[1] for x in o))
def test_one_step_of_every_variant_updates_the_policy(tmp_path, overrides):
    drop = [] if any("drop_zero_variance" in o for o in overrides) else ["algorithm.drop_zero_variance_groups=false"]
    result, rows = run(tmp_path, "logging.samples_every=1", *drop, *overrides)
    assert result.steps == rows[-1]["step"] >= 1
    last = rows[-1]
    if "algorithm.mask_truncated_completions=true" in overrides:  # 6 new tokens: nearly all truncated
        assert last["truncated_frac"] > 0
    else:
        assert last["policy_version"] == result.steps  # every step made an optimizer update
        assert last["loss"] is not None and last["grad_norm"] is not None
    assert last["reward"] is not None and 0 <= last["reward"] <= 1
    for key in ("loss", "entropy", "clip_frac_low", "clip_frac_high", "tokens_per_s", "lr", "grad_norm"):
        assert key in last, key
    assert any(k.startswith("pass_rate/") for k in last)
    if "algorithm.policy_loss.beta=0.05" in overrides:
        assert last["kl"] is not None and last["kl"] >= 0
    samples = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert samples and "verdicts" in json.loads(samples[0])


def test_update_changes_weights_and_matches_materialized_logits_gradient(tmp_path):
    """The loop's loss gradient (hidden states + fused op) equals the one from model(...).logits."""
    from rubric_fast.reference import policy_loss
    from rubric_fast.rubric import load_rubrics
    from rubric_fast.trainer import loop as L
    from rubric_fast.trainer import batches as B, config as C, rollouts as R, update as U
    from rubric_fast.trainer.models import build_char_tokenizer, load_policy
    from rubric_fast.trainer.rollout import Completion

    cfg = load_config(DEFAULT_CONFIG, SMALL + ["algorithm.is_cap=null"])
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = load_policy(cfg.model, tok, torch.device("cpu"))
    rub = load_rubrics(cfg.data.path)[0]
    prompt = R.encode_prompt(tok, rub.prompt)
    samples = []
    for i, n in enumerate([3, 5, 2, 6]):
        toks = torch.randint(4, 90, (n,)).tolist()
        samples.append(B.Sample(0, rub, prompt, Completion(prompt, toks, [0.0] * n, False, ""), 0,
                                reward=float(i % 2), advantage=(-1.0) ** i * (i + 1) / 3))
    mbs = [B.collate(mb, tok.pad_token_id, "cpu", mask_truncated=False, seq_offset=10 * k)
           for k, mb in enumerate(pack_micro_batches(samples, 24))]
    assert len(mbs) > 1
    n_tok = sum(float(mb.loss_weight.sum()) for mb in mbs)
    lcfg = C.policy_loss_config(cfg, normalizer=n_tok)
    # fused path, as the loop does it
    model.zero_grad()
    for mb in mbs:
        h, w, _ = U.token_hidden(model, mb)
        old = L.ops.linear_logprob_entropy(h.detach(), w.detach(), mb.targets, return_entropy=False)[0]
        loss, *_ = L.ops.fused_linear_policy_loss(h, w, mb.targets, old, mb.advantages, mb.loss_weight,
                                                  seq_index=mb.seq_index, config=lcfg)
        loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    # materialized logits, one batch
    model.zero_grad()
    total = 0.0
    for mb in mbs:
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids).logits
        lp = torch.log_softmax(logits.float(), -1)[mb.rows, mb.cols].gather(-1, mb.targets[:, None]).squeeze(-1)
        loss, _ = policy_loss(lp, lp.detach(), mb.advantages, mb.loss_weight, seq_index=mb.seq_index, config=lcfg)
        loss.backward()
        total += float(loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    assert any(g.abs().sum() > 0 for g in fused.values())


def test_checkpoint_and_resume(tmp_path):
    base = ["checkpoint.every=1", "checkpoint.keep_last=2", "checkpoint.resume=auto"]
    run(tmp_path, "max_steps=3", *base)
    ck = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ck == ["step_00000002", "step_00000003"]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)
    assert state["train_state"]["step"] == 3 and state["train_state"]["policy_version"] >= 1
    assert {"model", "optimizer", "scheduler", "train_state", "config", "judge_cache"} <= set(state)
    per_rank = torch.load(tmp_path / "run" / "checkpoints" / "step_00000003" / "rank_00000.pt", weights_only=True)
    assert {"rng", "group_counter", "pending"} <= set(per_rank) and {"python", "torch"} <= set(per_rank["rng"])
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / "manifest.json").exists()
    r2, rows = run(tmp_path, "max_steps=5", *base)
    assert r2.steps == 5 and [r["step"] for r in rows][-2:] == [4, 5]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]


def test_nan_loss_skips_steps_then_stops(tmp_path, monkeypatch):
    from rubric_fast.trainer import loop as L

    real = L.ops.fused_linear_policy_loss

    def nan_loss(*a, **k):
        loss, *rest = real(*a, **k)
        return (loss * float("nan"), *rest)

    monkeypatch.setattr(L.ops, "fused_linear_policy_loss", nan_loss)
    with pytest.raises(TrainingStopped, match="3 consecutive steps with a non-finite loss"):
        run(tmp_path, "max_steps=10", "max_nan_steps=3")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nan_steps"] for r in rows] == [1, 2]


def test_stale_samples_are_dropped(tmp_path):
    result, rows = run(tmp_path, "max_steps=3", "rollout.max_staleness=0", "rollout.overlap=true",
                       "algorithm.drop_zero_variance_groups=false")
    # with overlap, batch 2 was generated before update 1: one version old, dropped with max_staleness=0;
    # batch 3 was generated after the (skipped) step 2, so it is fresh again
    assert [r["staleness"] for r in rows] == [0, 1, 0]
    assert [r["stale_dropped"] for r in rows] == [0, 8, 0] and result.stale_dropped == 8


def test_scaffold_share_schedule():
    assert scaffold_share(0, 8, 0, 100, 0.5, 10.0) == pytest.approx(1 / (1 + math.exp(-5)))
    assert scaffold_share(7, 8, 0, 100, 0.5, 10.0) == 0.0
    assert scaffold_share(0, 8, 100, 100, 0.5, 10.0) < 0.01


def test_micro_batch_packing_respects_budget():
    from rubric_fast.trainer.batches import Sample
    from rubric_fast.trainer.rollout import Completion

    samples = [Sample(0, None, [1] * 5, Completion([], [2] * n, [0.0] * n, True, ""), 0) for n in (1, 9, 3, 7, 20)]
    mbs = pack_micro_batches(samples, 30)
    assert sorted(len(s.completion.token_ids) for mb in mbs for s in mb) == [1, 3, 7, 9, 20]
    for mb in mbs:
        width = max(len(s.prompt_ids) + len(s.completion.token_ids) for s in mb)
        assert len(mb) == 1 or len(mb) * width <= 30


def test_cli_runs_two_steps(tmp_path, capsys):
    from rubric_fast.cli import main

    rc = main(["train", *SMALL, "max_steps=2", f"logging.run_dir={tmp_path / 'cli'}"])
    assert rc == 0
    assert (tmp_path / "cli" / "metrics.jsonl").exists() and (tmp_path / "cli" / "config.yaml").exists()
    rc = main(["train", "optimization.lrr=1"])
    assert rc == 2 and "did you mean 'lr'" in capsys.readouterr().err


def test_dataset_errors_name_file_line_and_key(tmp_path, capsys):
    from rubric_fast.cli import main

    good = json.dumps({"prompt": "hi", "criteria": [{"text": "has a", "verifier": "contains",
                                                      "verifier_params": {"text": "a"}}]})
    bad = json.dumps({"prompt": "hi", "criteria": [{"text": "x", "verifier": "contains", "weight": -1}]})
    data = tmp_path / "bad.jsonl"
    data.write_text(good + "\n" + bad + "\n")
    rc = main(["train", *SMALL, f"data.path={data}", f"logging.run_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:2" in err and "weight" in err
    rc = main(["train", *SMALL, f"data.path={tmp_path / 'missing.jsonl'}", f"logging.run_dir={tmp_path / 'r'}"])
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err


def test_empty_completions_are_scored_and_trained(tmp_path, monkeypatch):
    """A policy that answers EOS at once: empty responses get rewards (not errors) and the step runs."""
    from rubric_fast.trainer import rollout as R

    real = R.HFRolloutEngine._completion
    calls = {"n": 0}

    def eos_first(self, prompt, new, logp):
        calls["n"] += 1
        if calls["n"] % 2:  # every other completion is empty: EOS as its first token
            new = new.clone()
            new[0] = self.eos_id
        return real(self, prompt, new, logp)

    monkeypatch.setattr(R.HFRolloutEngine, "_completion", eos_first)
    result, rows = run(tmp_path, "max_steps=2", "algorithm.mask_truncated_completions=true",
                       "logging.samples_every=1", "logging.num_samples=8")
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert any(s["response"] == "" for s in samples)
    assert all(s["reward"] is not None for s in samples)
    assert result.steps == 2 and rows[-1]["reward_missing"] == 0
    # empty responses are judged by the guard: counted per step and by reason
    assert all(r["guarded"] >= 1 and r["guarded/empty"] == r["guarded"] for r in rows)


def test_scaffold_messages_show_a_share_of_the_criteria():
    from rubric_fast.rubric import load_rubrics
    from rubric_fast.trainer.rollouts import scaffold_messages

    rub = load_rubrics(load_config(DEFAULT_CONFIG).data.path)[0]
    assert scaffold_messages(rub, 0.0) == rub.prompt
    full = scaffold_messages(rub, 1.0)
    assert full[0]["role"] == "system" and all(c.text in full[0]["content"] for c in rub.criteria)
    half = scaffold_messages(rub, 0.5)
    assert sum(c.text in half[0]["content"] for c in rub.criteria) == len(rub.criteria) // 2
    assert full[1:] == rub.prompt


def test_gradient_checkpointing_step(tmp_path):
    result, rows = run(tmp_path, "model.gradient_checkpointing=true", "algorithm.drop_zero_variance_groups=false")
    assert result.steps == 1 and rows[-1]["grad_norm"] is not None


def test_sampler_and_trainer_logprobs_agree_on_policy(tmp_path):
    """On-policy with top_p = 1 the truncated IS weight pi_old / pi_sampler is 1: the left-padded sampler
    and the right-padded hidden-state path of the trainer compute the same log-probs."""
    _, rows = run(tmp_path, "rollout.overlap=false", "rollout.temperature=0.8",
                  "algorithm.drop_zero_variance_groups=false")
    assert rows[-1]["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    # top-p renormalises the sampler's distribution: pi_old / pi_sampler < 1 on the kept tokens
    _, rows = run(tmp_path / "p", "rollout.overlap=false", "rollout.top_p=0.3",
                  "algorithm.drop_zero_variance_groups=false")
    assert rows[-1]["is_weight_mean"] < 0.99


@pytest.mark.parametrize("overlap", ["false", "true"])
def test_resume_continues_exactly(tmp_path, overlap, monkeypatch):
    """4 steps in one go == a run killed after step 2 and resumed (model, optimizer, scheduler, RNG, data
    position, and with overlap the batch generated ahead)."""
    from rubric_fast.trainer import loop as L

    common = [f"rollout.overlap={overlap}", "algorithm.drop_zero_variance_groups=false", "checkpoint.every=1",
              "checkpoint.resume=auto", "optimization.schedule=linear", "optimization.warmup_steps=0",
              "data.shuffle=true", "max_steps=4"]
    straight, _ = run(tmp_path / "a", *common)
    real_save = L.save_checkpoint

    def save_then_die(d, step, bundle, **kw):
        real_save(d, step, bundle, **kw)
        if step == 2:
            raise KeyboardInterrupt  # the job is killed right after the step-2 checkpoint

    monkeypatch.setattr(L, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", *common)
    monkeypatch.setattr(L, "save_checkpoint", real_save)
    resumed, _ = run(tmp_path / "b", *common)
    assert resumed.rewards == straight.rewards  # the whole history: the checkpoint carries steps 1-2
    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)


def test_two_processes_gloo(tmp_path):
    """torchrun with 2 CPU processes: global normalizers and summed gradients keep both ranks in step."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "rubric_fast.trainer", *SMALL, "max_steps=2", "checkpoint.save_final=true",
           "algorithm.drop_zero_variance_groups=false", f"logging.run_dir={run_dir}"]
    env = {**os.environ, "RUBRIC_FAST_DUMP_PARAM_SUM": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["policy_version"] == 2
    # the two ranks write to one stderr: their lines may interleave, so match the pattern, not lines
    sums = re.findall(r"rank (\d) param checksum ([-+.0-9e]+?)(?=\[|\s|$)", proc.stderr)
    assert sorted(r for r, _ in sums) == ["0", "1"] and len({c for _, c in sums}) == 1, sums


def test_judge_config_errors_are_reported_by_key(tmp_path, capsys, monkeypatch):
    from rubric_fast.cli import main

    rc = main(["train", *SMALL, "judge.type=oracle", f"logging.run_dir={tmp_path / 'j'}"])
    assert rc == 2 and "judge.type" in capsys.readouterr().err
    monkeypatch.delenv("JUDGE_API_KEY", raising=False)
    rc = main(["train", *SMALL, "judge.type=http", "judge.model=m", "judge.endpoints=[http://127.0.0.1:9/v1]",
               "judge.api_key_env=JUDGE_API_KEY", f"logging.run_dir={tmp_path / 'j'}"])
    assert rc == 2 and "JUDGE_API_KEY" in capsys.readouterr().err


def test_example_configs_build_their_scorer(monkeypatch):
    from pathlib import Path

    from rubric_fast.rubric import load_rubrics
    from rubric_fast.trainer.rewards import make_scorer

    monkeypatch.setenv("JUDGE_API_KEY", "test")
    for p in sorted(Path(DEFAULT_CONFIG).parent.glob("*.yaml")):
        cfg = load_config(p)
        make_scorer(cfg.judge, cfg.scoring, cfg.rollout.num_generations).close()
        assert load_rubrics(cfg.data.path, cfg.data.format), p
