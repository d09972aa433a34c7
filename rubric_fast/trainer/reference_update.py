"""Dynamic KL reference: the reference policy refreshed from the policy during training.

Hou et al. 2025, "T1: Advancing Language Model Reasoning through Reinforcement Learning and Inference
Scaling" (arXiv:2501.11651): the KL anchor is not kept at the initial policy but moved along with training
(a *dynamic anchor*), so the KL penalty restrains each stretch of updates without pulling the policy back to
where it started. Two forms (``algorithm.ref_update_interval`` N, ``algorithm.ref_ema`` alpha):

    copy (alpha null):  every N steps        theta_ref <- theta
    EMA  (alpha set):   every N steps (N = 0: every step)   theta_ref <- alpha theta_ref + (1 - alpha) theta

Under fsdp2 the policy's parameters are shards: each is gathered (``full_tensor``, a collective that every
rank runs at the same step) into the reference, which is a full replica on every rank. The reference's
weights are part of the checkpoint, so a resumed run continues with the same anchor.
"""

from __future__ import annotations

import torch
from torch import nn

from rubric_fast.settings import check_fields

from .dist import full_tensor


def is_dynamic(a) -> bool:
    """``a``: the trainer's AlgorithmConfig."""
    return a.ref_update_interval > 0 or a.ref_ema is not None


def is_due(a, step: int) -> bool:
    """After training step ``step`` (1-based), is the reference refreshed?"""
    if not is_dynamic(a):
        return False
    period = a.ref_update_interval if a.ref_update_interval > 0 else 1
    return step % period == 0


@torch.no_grad()
def update_reference(reference: nn.Module, policy: nn.Module, *, ema: float | None) -> None:
    """Copy (``ema=None``) or blend the policy's parameters into the reference's, matched by name."""
    ref = dict(reference.named_parameters())
    seen = set()
    for name, p in policy.named_parameters():
        src = full_tensor(p.detach())  # fsdp2: gather the shards (every rank calls this)
        dst = ref[name]
        seen.add(name)
        if ema is None:
            dst.copy_(src.to(dst.dtype))
        else:
            dst.mul_(ema).add_(src.to(dst.dtype), alpha=1.0 - ema)
    missing = set(ref) - seen
    if missing:
        raise RuntimeError(f"reference update: the policy has no parameters {sorted(missing)[:3]}")


def check_config(a, *, lora: bool, key: str = "algorithm") -> None:
    """ValueError naming the key (``a`` is the trainer's AlgorithmConfig)."""
    check_fields(a, key + ".")  # ref_update_interval's and ref_ema's own checks (AlgorithmConfig)
    if not is_dynamic(a):
        return
    which = "ref_update_interval" if a.ref_update_interval > 0 else "ref_ema"
    if a.policy_loss.beta <= 0:
        raise ValueError(f"{key}.{which}: a dynamic reference needs the KL term, but {key}.policy_loss.beta is "
                         f"{a.policy_loss.beta:g}; "
                         "set beta > 0 or remove the reference update")
    mode = a.reference if a.reference != "auto" else ("lora_base" if lora else "copy")
    if mode != "copy":
        raise ValueError(f"{key}.reference: a dynamic reference ({key}.{which}) needs reference=copy; "
                         f"{mode} uses the frozen base weights under the LoRA adapters")
