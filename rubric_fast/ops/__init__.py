"""Public ops: the drop-in surface for this trainer and for others (TRL, verl, custom loops).

Every op is registered with ``torch.library`` in the ``rubric_fast`` namespace, runs under
``torch.compile(fullgraph=True)``, and exists for every backend (``torch`` reference, ``cpu`` C++,
``cuda`` C++, ``triton``); see :mod:`rubric_fast.ops.backend` for the choice. The math is in
docs/ops-math.md.
"""

from ..reference import truncated_importance_weight
from ..reference.types import PolicyLossConfig, PolicyLossStats
from .backend import available_backends, current_backend, use_backend
from .linear import linear_logprob_entropy
from .policy import fused_linear_policy_loss, policy_loss
from .small import entropy_mask, group_advantages

__all__ = [
    "PolicyLossConfig", "PolicyLossStats", "available_backends", "current_backend", "entropy_mask",
    "fused_linear_policy_loss", "group_advantages", "linear_logprob_entropy", "policy_loss",
    "truncated_importance_weight", "use_backend",
]
