"""``rubric_fast::group_advantages`` and ``rubric_fast::entropy_mask``: registration and dispatch."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..reference.entropy_mask import distributed_entropy_mask, selection_count, topk_mask
from ..reference.group_advantages import group_advantages as ref_group_advantages
from ..reference.group_advantages import resolve_scale
from . import backend as _backend
from ._checks import check_same_device


def _ga_native(rewards, group_index, estimator, scale, eps, positive_weight, metric):
    return torch.ops.rubric_fast.group_advantages_native(rewards, group_index, estimator, scale, eps,
                                                         positive_weight, metric)


def _ga_torch(rewards, group_index, estimator, scale, eps, positive_weight, metric):
    return ref_group_advantages(rewards, group_index, estimator=estimator, scale=scale, eps=eps,
                                positive_weight=positive_weight, metric=metric)


def _em_native(entropy, valid, k):
    return torch.ops.rubric_fast.entropy_mask_native(entropy, valid, k)


# One table per op: backend -> implementation; absent means unsupported (these two have no Triton kernel:
# on CUDA tensors they run the CUDA C++ ops).
GROUP_ADVANTAGES = {"torch": _ga_torch, "cpu": _ga_native, "cuda": _ga_native}
ENTROPY_MASK = {"torch": topk_mask, "cpu": _em_native, "cuda": _em_native}


@torch.library.custom_op("rubric_fast::group_advantages", mutates_args=())
def _group_advantages_op(rewards: Tensor, group_index: Tensor, estimator: str, scale: str, eps: float,
                         positive_weight: float, metric: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    adv, valid = GROUP_ADVANTAGES[backend](rewards, group_index, estimator, scale, eps, positive_weight, metric)
    return adv.to(dt).contiguous(), valid.to(torch.bool).contiguous()


@_group_advantages_op.register_fake
def _(rewards, group_index, estimator, scale, eps, positive_weight, metric, backend):
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    return rewards.new_empty(rewards.shape, dtype=dt), rewards.new_empty(rewards.shape, dtype=torch.bool)


def group_advantages(rewards: Tensor, group_index: Tensor, *, estimator: str = "grpo", scale: str | None = None,
                     eps: float = 1e-6, positive_weight: float = 0.1, metric: Tensor | None = None):
    """Advantages of B rewards (NaN = missing) in groups -> (advantages f32[B], valid bool[B]).

    ``scale=None`` uses the estimator's default (grpo, canon: ``group``; dr_grpo, rloo, w_reinforce:
    ``none``). ``positive_weight`` is W-REINFORCE's lambda, ``metric`` the quantity CANON splits by.
    See docs/ops-math.md.
    """
    scale = resolve_scale(estimator, scale)
    if not isinstance(rewards, Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards: expected a floating tensor of shape [B], got {getattr(rewards, 'shape', rewards)}")
    if not isinstance(group_index, Tensor) or group_index.shape != rewards.shape:
        raise ValueError(f"group_index: expected shape {tuple(rewards.shape)}, got {getattr(group_index, 'shape', None)}")
    if group_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"group_index: expected int64, got {group_index.dtype}")
    if estimator == "canon" and (metric is None or metric.shape != rewards.shape):
        raise ValueError("metric: estimator='canon' needs a per-response metric of the same shape as rewards")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps: must be a finite number >= 0, got {eps}")
    check_same_device(rewards=rewards, group_index=group_index, metric=metric)
    be = _backend.select(rewards.device, "group_advantages", tuple(GROUP_ADVANTAGES))
    return _group_advantages_op(rewards.contiguous(), group_index.long().contiguous(), estimator, scale, float(eps),
                                float(positive_weight), None if metric is None else metric.contiguous(), be)


@torch.library.custom_op("rubric_fast::entropy_mask", mutates_args=())
def _entropy_mask_op(entropy: Tensor, valid: Tensor, top_fraction: float, backend: str) -> Tensor:
    k = selection_count(top_fraction, int(valid.sum()))
    return ENTROPY_MASK[backend](entropy, valid, k).to(torch.bool)


@_entropy_mask_op.register_fake
def _(entropy, valid, top_fraction, backend):
    return entropy.new_empty(entropy.shape, dtype=torch.bool)


def entropy_mask(entropy: Tensor, valid: Tensor, top_fraction: float, *, process_group=None) -> Tensor:
    """Exactly ceil(top_fraction * n_valid) valid tokens of highest entropy (ties: lower position first).

    With ``process_group`` the count and the threshold are global across its ranks (radix select with
    histogram all-reduces; no rank gathers the others' entropies).
    """
    if entropy.dim() != 1 or not entropy.is_floating_point():
        raise ValueError(f"entropy: expected a floating tensor of shape [N], got {entropy.dtype} {tuple(entropy.shape)}")
    if valid.shape != entropy.shape or valid.dtype != torch.bool:
        raise ValueError(f"valid: expected a bool tensor of shape {tuple(entropy.shape)}, got {valid.dtype} {tuple(valid.shape)}")
    if not (0.0 <= top_fraction <= 1.0):
        raise ValueError(f"top_fraction: must be in [0, 1], got {top_fraction}")
    check_same_device(entropy=entropy, valid=valid)
    entropy = entropy.detach()
    if process_group is not None:
        return distributed_entropy_mask(entropy.float(), valid, top_fraction, process_group)
    be = _backend.select(entropy.device, "entropy_mask", tuple(ENTROPY_MASK))
    return _entropy_mask_op(entropy.float().contiguous(), valid.contiguous(), float(top_fraction), be)
