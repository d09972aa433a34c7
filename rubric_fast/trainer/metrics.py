"""What one step logs: rewards, pass rates per criterion, the guard, lengths, the loss statistics and the
times (``step_metrics``), and the sample rows of ``samples.jsonl`` (``sample_row``)."""

from __future__ import annotations

from typing import Any

from .batches import RolloutBatch, Sample


def step_metrics(batch: RolloutBatch, mean_reward: float, upd: dict[str, Any], update_time: float,
                 score_wait: float, stale: int, counters: dict[str, int], policy_version: int, staleness: int,
                 scheduler) -> dict[str, float]:
    m: dict[str, float] = {"reward": mean_reward}
    rs = [s.reward for s in batch.samples if s.reward is not None]
    if len(rs) > 1:
        mu = sum(rs) / len(rs)
        m["reward_std"] = (sum((r - mu) ** 2 for r in rs) / (len(rs) - 1)) ** 0.5
    m["reward_missing"] = float(sum(s.reward is None for s in batch.samples))
    # responses the guard judged junk in this step, by reason (rubric_fast.judges.guard.REASONS)
    reasons = [s.guard_reason for s in batch.samples if s.guard_reason]
    m["guarded"] = float(len(reasons))
    for reason in sorted(set(reasons)):
        m[f"guarded/{reason}"] = float(reasons.count(reason))
    passed: dict[str, list[float]] = {}
    for s in batch.samples:
        ids = {c.id for c in s.rubric.criteria}
        for v in s.verdicts:
            if v.score is not None and v.criterion_id in ids:  # not the guard's holistic verdicts
                passed.setdefault(v.criterion_id, []).append(1.0 if v.score >= 0.5 else 0.0)
    for cid, xs in sorted(passed.items()):
        m[f"pass_rate/{cid}"] = sum(xs) / len(xs)
    lens = [len(s.completion.token_ids) for s in batch.samples]
    m["completion_len"] = sum(lens) / max(1, len(lens))
    m["truncated_frac"] = sum(not s.completion.finished for s in batch.samples) / max(1, len(batch.samples))
    st = upd["stats"]
    m.update({"loss": upd["loss"], "kl": st.get("kl_mean", 0.0), "entropy": upd["entropy"],
              "clip_frac_low": st.get("clip_frac_low", 0.0), "clip_frac_high": st.get("clip_frac_high", 0.0),
              "ratio_mean": st.get("ratio_mean", 1.0), "is_weight_mean": upd["is_weight"],
              "grad_norm": upd["grad_norm"], "lr": scheduler.get_last_lr()[0],
              "tokens_per_s": upd["tokens"] / update_time if update_time > 0 else 0.0,
              "rollout_tokens_per_s": batch.rollout_tokens / batch.rollout_time if batch.rollout_time > 0 else 0.0,
              "time/rollout": batch.rollout_time, "time/update": update_time, "time/score_wait": score_wait,
              "policy_version": float(policy_version), "staleness": float(staleness),
              "stale_dropped": float(stale), "stale_dropped_total": float(counters["stale_dropped"]),
              "nan_steps": float(counters["nan_steps"])})
    return m


def sample_row(tokenizer, s: Sample) -> dict[str, Any]:
    return {"prompt": s.rubric.prompt, "response": s.completion.text, "reward": s.reward,
            "advantage": s.advantage, "verdicts": [{"criterion_id": v.criterion_id, "score": v.score,
                                                    "reason": v.reason, "error": v.error} for v in s.verdicts],
            **({"extras": s.extras} if s.extras else {})}
