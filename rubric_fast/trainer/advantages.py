"""The loop's step 3: group advantages for the step's samples (missing rewards excluded), the method switches
that act on them (OREAL's factors and best/worst selection, EMPG's per-token advantages), and the samples
that train (valid, kept, in a group with signal, non-empty)."""

from __future__ import annotations

import torch

from rubric_fast import ops

from . import empg, oreal
from .batches import Sample
from .config import AlgorithmConfig


def assign_advantages(samples: list[Sample], a: AlgorithmConfig, *, n_groups: int, device,
                      metrics: dict[str, float]) -> list[Sample]:
    """Write each sample's advantage (and EMPG's token advantages); return the samples to train on. A
    collective with EMPG (every rank calls it, also with no samples)."""
    if not samples:
        return []
    r_t = torch.tensor([float("nan") if s.reward is None else s.reward for s in samples], dtype=torch.float32)
    g_t = torch.tensor([s.group_id for s in samples], dtype=torch.long)
    metric = torch.tensor([float(len(s.completion.token_ids)) for s in samples])
    adv, valid = ops.group_advantages(r_t, g_t, estimator=a.estimator, scale=a.scale, eps=a.adv_eps,
                                      positive_weight=a.positive_weight,
                                      metric=metric if a.estimator == "canon" else None)
    adv = adv.float() * a.advantage_sign
    # OREAL: positive / negative loss factors, folded into the advantages (see oreal.py)
    adv_list = oreal.scale_advantages(adv.tolist(), a.positive_loss_factor, a.negative_loss_factor)
    keep = (oreal.best_worst_keep([s.reward for s in samples], [s.group_id for s in samples])
            if a.best_worst_only else [True] * len(samples))
    if a.empg.enabled:  # per-token advantages g(H_t) A_i + zeta f(H_t+1) (a collective: every rank)
        idx = [i for i, ok in enumerate(valid.tolist()) if ok]
        step_adv = empg.empg_step_advantages([adv_list[i] for i in idx],
                                             [samples[i].completion.turn_entropy for i in idx], a.empg, device=device)
        for i, sa in zip(idx, step_adv):
            c = samples[i].completion
            samples[i].token_advantages = empg.token_advantages(sa, c.turn_spans, len(c.token_ids))
        hs = [h for i in idx for h in samples[i].completion.turn_entropy]
        if hs:
            metrics["empg/step_entropy"] = sum(hs) / len(hs)
    live_groups = set()
    for s, av, ok in zip(samples, adv_list, valid.tolist()):
        s.advantage = av
        if ok and (av != 0.0 or not a.drop_zero_variance_groups):
            live_groups.add(s.group_id)
    train_samples = [s for s, ok, kp in zip(samples, valid.tolist(), keep)
                     if ok and kp and s.group_id in live_groups and len(s.completion.token_ids) > 0]
    metrics["groups_dropped"] = float(n_groups - len(live_groups))
    metrics["samples_trained"] = float(len(train_samples))
    return train_samples
