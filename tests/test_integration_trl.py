"""TRL integration: rubric reward functions, the GRPOConfig -> PolicyLossConfig mapping, and
RubricFastGRPOTrainer's loss against TRL's own ``GRPOTrainer._compute_loss`` on the same batch and weights.

Tiny Llama built from a config and a character tokenizer (examples/integrations/tiny_model.py): no downloads.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rubric_fast.integrations.trl import (  # noqa: E402
    AsyncRubricReward,
    RubricFastGRPOTrainer,
    RubricReward,
    UnsupportedTRLConfig,
    policy_loss_mapping,
)
from rubric_fast.rubric import RubricError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "integrations"))
from tiny_model import tiny_model, tiny_tokenizer  # noqa: E402

RULE_RUBRIC = {"criteria": [
    {"id": "has_a", "text": "Contains the letter a.", "verifier": "regex", "verifier_params": {"pattern": "a"}},
    {"id": "short", "text": "At most 5 characters.", "verifier": "length",
     "verifier_params": {"max": 5, "unit": "chars"}, "weight": 2},
]}
# an LLM criterion under the rule judge: that judgement fails, so the reward is None (never 0)
LLM_RUBRIC = {"criteria": [{"id": "kind", "text": "The response is kind."}]}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                max_completion_length=8, max_steps=3, use_cpu=True, report_to="none", bf16=False,
                logging_steps=1, save_strategy="no", seed=0)
    base.update(kw)
    return GRPOConfig(**base)


# ---------------------------------------------------------------------------------------------- rewards
def test_reward_function_values_none_and_forms():
    reward = RubricReward()
    try:
        prompts = ["p1", "p2", "p3", "p4", "p5"]
        completions = ["a", "bbbbbbbb", "zzz", "zzz", [{"role": "assistant", "content": "ab"}]]
        rubrics = [RULE_RUBRIC, json.dumps(RULE_RUBRIC), RULE_RUBRIC["criteria"], LLM_RUBRIC, RULE_RUBRIC]
        logged = {}
        out = reward(prompts, completions, rubric=rubrics, log_metric=lambda k, v: logged.__setitem__(k, v))
        # weighted_mean of has_a (w 1) and short (w 2)
        assert out[0] == pytest.approx(1.0)
        assert out[1] == pytest.approx(0.0)          # neither: a real 0, not a failure
        assert out[2] == pytest.approx(2 / 3)        # short only
        assert out[3] is None                        # failed judgement
        assert out[4] == pytest.approx(1.0)          # chat completion: last assistant message
        assert logged["rubric_reward/failed_frac"] == pytest.approx(1 / 5)
    finally:
        reward.close()


def test_reward_function_points_items_and_arrow_nones():
    # verl / HealthBench items {criterion, points}; Arrow fills missing struct keys with None
    items = [{"criterion": "contains a", "points": 2, "verifier": "regex",
              "verifier_params": {"pattern": "a", "max": None}},
             {"criterion": "long", "points": -1, "verifier": "length",
              "verifier_params": {"pattern": None, "min": 4, "unit": "chars"}}]
    with RubricReward() as reward:
        out = reward(["q", "q"], ["a", "aaaa"], rubric=[items, {"rubrics": items, "ground_truth": "x"}])
    # healthbench: met points / positive points, clipped to [0, 1]
    assert out == [pytest.approx(1.0), pytest.approx(0.5)]


def test_async_reward_function():
    reward = AsyncRubricReward(name="rubric_async")
    assert asyncio.iscoroutinefunction(reward.__call__)

    async def go():
        try:
            return await reward(["p", "p"], ["a", "zzzzzzzz"], rubric=[RULE_RUBRIC, LLM_RUBRIC])
        finally:
            await reward.aclose()

    assert asyncio.run(go()) == [pytest.approx(1.0), None]


def test_reward_function_errors_name_the_column_and_row():
    with RubricReward() as reward:
        with pytest.raises(KeyError, match="no column 'rubric'"):
            reward(["p"], ["a"], other=[1])
        with pytest.raises(RubricError, match="column 'rubric', row 1.*not valid JSON"):
            reward(["p", "p"], ["a", "a"], rubric=[RULE_RUBRIC, "{not json"])


# ---------------------------------------------------------------------------------------------- mapping
@pytest.mark.parametrize("kw,arg", [
    (dict(loss_type="vespo"), "GRPOConfig.loss_type='vespo'"),
    (dict(loss_type="cispo", importance_sampling_level="sequence", epsilon_high=5.0), "importance_sampling_level"),
    (dict(beta=0.1), "GRPOConfig.use_bias_correction_kl=True"),
    (dict(loss_type="dapo", entropy_coef=0.01), "entropy_coef=0.01"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
    (dict(top_entropy_quantile=0.2, importance_sampling_level="sequence"), "top_entropy_quantile=0.2"),
    (dict(top_entropy_quantile=0.2, beta=0.1, use_bias_correction_kl=False), "entropy_selection='quantile'"),
    (dict(loss_type="cispo", epsilon_high=0.3), "epsilon_high=0.3"),
    (dict(delta=1.1, epsilon_high=0.28), "delta=1.1"),
    (dict(epsilon=1.5), "epsilon=1.5"),
])
def test_unsupported_settings_are_refused_by_name(tmp_path, kw, arg):
    with pytest.raises(UnsupportedTRLConfig) as info:
        policy_loss_mapping(_args(tmp_path, **kw))
    msg = str(info.value)
    assert "GRPOConfig." in msg and arg in msg, msg


def test_mapping_fields(tmp_path):
    m = policy_loss_mapping(_args(tmp_path, loss_type="cispo", epsilon_high=5.0, temperature=0.7))
    assert (m.config.loss, m.config.eps_high, m.temperature) == ("cispo", 4.0, 0.7)
    m = policy_loss_mapping(_args(tmp_path, loss_type="grpo", importance_sampling_level="sequence", delta=1.5))
    assert (m.config.loss, m.config.delta) == ("gspo", 1.5)
    assert m.for_batch(num_seqs=4, num_tokens=10, grad_accum_steps=2).normalizer == 8
    m = policy_loss_mapping(_args(tmp_path, loss_type="dr_grpo"))
    cfg = m.for_batch(num_seqs=4, num_tokens=10, grad_accum_steps=2)
    assert (cfg.aggregation, cfg.normalizer) == ("constant", 4 * 8 * 2)
    # TRL keeps the top-rho fraction: rho maps to the kept fraction itself
    m = policy_loss_mapping(_args(tmp_path, top_entropy_quantile=0.2))
    assert m.config.top_entropy_fraction == 0.2
    assert policy_loss_mapping(_args(tmp_path, top_entropy_quantile=0.0)).config.top_entropy_fraction > 0


def test_trl_top_entropy_quantile_keeps_the_top_rho_fraction():
    """Pins the documented mapping fraction = top_entropy_quantile against TRL's own mask."""
    class Acc:
        def pad_across_processes(self, x, **_):
            return x

        def gather(self, x):
            return x

    ent = torch.arange(1, 21, dtype=torch.float32).view(2, 10)
    mask = torch.ones(2, 10)
    trainer = type("T", (), {"accelerator": Acc()})()
    kept = GRPOTrainer.get_high_entropy_mask(trainer, ent, mask, 1 - 0.2)
    assert int(kept.sum()) == 4 and bool(kept.view(-1)[-4:].all())  # the 4 = 0.2 * 20 highest


# ---------------------------------------------------------------------------------------------- loss parity
@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=1)
    ds = datasets.Dataset.from_list([{"prompt": "say a", "rubric": json.dumps(RULE_RUBRIC)}] * 4)
    args = _args(tmp_path_factory.mktemp("parity"), temperature=0.7, steps_per_generation=2,
                 gradient_accumulation_steps=2)
    trainer = RubricFastGRPOTrainer(model=model, reward_funcs=RubricReward(), args=args, train_dataset=ds,
                                    processing_class=tok)
    trainer.current_gradient_accumulation_steps = 2
    model.train()
    g = torch.Generator().manual_seed(0)
    bsz, plen, clen = 4, 3, 7
    prompt_ids = torch.randint(3, len(tok), (bsz, plen), generator=g)
    prompt_mask = torch.ones(bsz, plen, dtype=torch.long)
    prompt_mask[1, 0] = 0  # left padding
    completion_ids = torch.randint(3, len(tok), (bsz, clen), generator=g)
    lengths = [7, 5, 3, 6]
    completion_mask = (torch.arange(clen)[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        cur, _, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), clen)
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.3, -0.7, 0.4, -1.1]),
        "old_per_token_logps": cur + 0.25 * torch.randn(bsz, clen, generator=g),
        "ref_per_token_logps": cur + 0.3 * torch.randn(bsz, clen, generator=g),
        "num_items_in_batch": completion_mask.sum() * 2,
    }
    return trainer, model, inputs


def _set(trainer, **kw):
    """Set a GRPOConfig field on the args (read by our mapping) and on the trainer (read by TRL's loss)."""
    attr = {"epsilon": "epsilon_low"}
    for k, v in kw.items():
        setattr(trainer.args, k, v)
        if k in ("loss_type", "beta", "importance_sampling_level", "top_entropy_quantile", "entropy_coef",
                 "off_policy_mask_threshold", "epsilon"):
            setattr(trainer, attr.get(k, k), v)
    trainer.epsilon_high = trainer.args.epsilon_high if trainer.args.epsilon_high is not None else trainer.args.epsilon
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0


def _loss_and_grads(fn, model):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),
    "cispo": dict(loss_type="cispo", epsilon_high=1.2),
    "sapo": dict(loss_type="sapo"),
    "luspo_token": dict(loss_type="luspo"),
    # small epsilon: the sequence ratios (means of the token log-ratios) sit near 1; make the clip bite
    "luspo_seq": dict(loss_type="luspo", importance_sampling_level="sequence", epsilon=0.02),
    "gspo_grpo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.02),
    "gspo_dapo": dict(loss_type="dapo", importance_sampling_level="sequence", epsilon=0.02, epsilon_high=0.03),
    "delta": dict(loss_type="grpo", delta=1.3, epsilon=0.1, epsilon_high=0.15),
    "beta": dict(loss_type="bnpo", beta=0.2, use_bias_correction_kl=False),
    "on_policy": dict(loss_type="dapo", old=None),
    "entropy_coef": dict(loss_type="bnpo", entropy_coef=0.05),
    "off_policy_mask": dict(loss_type="dapo", off_policy_mask_threshold=0.01),
    "quantile_beta": dict(loss_type="grpo", top_entropy_quantile=0.3, beta=0.2, use_bias_correction_kl=False,
                          entropy_selection="quantile"),
    # rho = 0.5: TRL's quantile and ceil(rho * n) keep the same count (no ties in random entropies)
    "top_fraction": dict(loss_type="dapo", top_entropy_quantile=0.5),
}
DEFAULTS = dict(loss_type="dapo", epsilon=0.2, epsilon_high=None, delta=None, beta=0.0, importance_sampling_level="token",
                top_entropy_quantile=1.0, entropy_coef=0.0, off_policy_mask_threshold=None,
                use_bias_correction_kl=True)


@pytest.mark.parametrize("case", list(CASES))
def test_loss_matches_trl(parity, case):
    trainer, model, inputs = parity
    kw = dict(CASES[case])
    trainer.entropy_selection = kw.pop("entropy_selection", "top_fraction")
    inputs = dict(inputs)
    if "old" in kw:
        kw.pop("old")
        inputs.pop("old_per_token_logps")
    _set(trainer, **{**DEFAULTS, **kw})
    ref_loss, ref_grads = _loss_and_grads(lambda: GRPOTrainer._compute_loss(trainer, model, inputs), model)
    loss, grads = _loss_and_grads(lambda: trainer._compute_loss(model, inputs), model)
    assert math.isfinite(float(ref_loss)) and float(ref_loss) != 0.0
    torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=2e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        scale = ref_grads[name].abs().max().clamp(min=1e-6)
        torch.testing.assert_close(grads[name] / scale, ref_grads[name] / scale, rtol=0, atol=5e-5,
                                   msg=lambda m, n=name: f"{case}: grad of {n}: {m}")
    # the metrics TRL logs come out the same too
    for key in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "kl", "cispo_clip_ratio"):
        vals = trainer._metrics["train"].get(key)
        if vals and len(vals) >= 2:
            assert vals[-1] == pytest.approx(vals[-2], rel=1e-4, abs=1e-6), key


# ---------------------------------------------------------------------------------------------- training
def test_grpo_trainer_trains_three_steps_with_rubric_rewards(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=2)
    rows = [{"prompt": "say a", "rubric": json.dumps(RULE_RUBRIC)},
            {"prompt": "be kind", "rubric": json.dumps(LLM_RUBRIC)}]  # always None: TRL excludes it
    ds = datasets.Dataset.from_list(rows * 2)
    sync_reward, async_reward = RubricReward(name="rubric_sync"), AsyncRubricReward(name="rubric_async")
    args = _args(tmp_path, max_steps=3, learning_rate=1e-2, reward_weights=[0.5, 0.5])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = RubricFastGRPOTrainer(model=model, reward_funcs=[sync_reward, async_reward], args=args,
                                    train_dataset=ds, processing_class=tok)
    try:
        trainer.train()
    finally:
        sync_reward.close()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["entropy"]) for h in logs)
    failed = [h["rubric_sync/failed_frac"] for h in logs]
    assert all(f in (0.0, 0.5, 1.0) for f in failed) and sum(failed) > 0, failed  # the LLM rubric fails, as None
    assert all(0.0 <= h["rewards/rubric_async/mean"] <= 1.0 for h in logs)
    changed = any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    assert changed, "three optimizer steps left every weight unchanged"


def test_trainer_refuses_at_construction(tmp_path):
    tok = tiny_tokenizer()
    ds = datasets.Dataset.from_list([{"prompt": "x", "rubric": json.dumps(RULE_RUBRIC)}] * 2)
    with pytest.raises(UnsupportedTRLConfig, match="GRPOConfig.loss_type='vespo'"):
        RubricFastGRPOTrainer(model=tiny_model(tok), reward_funcs=RubricReward(), train_dataset=ds,
                              args=_args(tmp_path, loss_type="vespo"), processing_class=tok)
