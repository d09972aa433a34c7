"""Plain-torch implementations of every op: the CPU path of the ``torch`` backend and the test oracle.

Each formula is written down in docs/ops-math.md with the method it comes from. Everything here is
correct in float64 (fp64 in, fp64 out) and fp32 otherwise.
"""

from .entropy_mask import distributed_entropy_mask, entropy_mask, selection_count, topk_mask
from .group_advantages import ESTIMATORS, SCALES, group_advantages, resolve_scale
from .linear_logprob_entropy import linear_logprob_entropy, linear_logprob_entropy_materialized
from .policy_loss import kl_estimate, policy_loss, truncated_importance_weight
from .types import AGGREGATIONS, KL_ESTIMATORS, LOSSES, PolicyLossConfig, PolicyLossStats


def fused_linear_policy_loss(hidden, weight, targets, old_logp, advantages, loss_weight, *, ref_logp=None,
                             is_weight=None, seq_index=None, entropy_mask=None, config: PolicyLossConfig,
                             bias=None, temperature=1.0, ignore_index=-100):
    """linear -> log-prob / entropy -> (entropy selection) -> policy loss, composed from the pieces above."""
    import torch

    need_entropy = config.entropy_coef != 0 or config.top_entropy_fraction is not None
    logp, ent, _ = linear_logprob_entropy(hidden, weight, targets, bias=bias, temperature=temperature,
                                          ignore_index=ignore_index)
    if old_logp is None:  # on-policy
        old_logp = logp.detach()
    if entropy_mask is None and config.top_entropy_fraction is not None:
        valid = (loss_weight != 0) & (targets != ignore_index)
        entropy_mask = globals()["entropy_mask"](ent.detach(), valid, config.top_entropy_fraction)
    loss, stats = policy_loss(logp, old_logp, advantages, loss_weight, ref_logp=ref_logp, is_weight=is_weight,
                              seq_index=seq_index, config=config, entropy=ent if need_entropy else None,
                              entropy_mask=entropy_mask)
    del torch
    return loss, stats, logp, ent


__all__ = [
    "AGGREGATIONS", "ESTIMATORS", "KL_ESTIMATORS", "LOSSES", "SCALES", "PolicyLossConfig", "PolicyLossStats",
    "distributed_entropy_mask", "entropy_mask", "fused_linear_policy_loss", "group_advantages", "kl_estimate",
    "linear_logprob_entropy", "linear_logprob_entropy_materialized", "policy_loss", "resolve_scale",
    "selection_count", "topk_mask", "truncated_importance_weight",
]
