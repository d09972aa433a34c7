"""The ops the trainer calls: ``rubric_fast.ops`` when it imports, else the plain-torch reference.

The reference has the same signatures (it is the contract's executable form), so the loop never needs to
know which one it got. TODO(lead): drop the fallback once rubric_fast.ops is complete.
"""

from __future__ import annotations

try:  # pragma: no cover - depends on which backend is built
    from rubric_fast.ops import (  # type: ignore[attr-defined]
        PolicyLossConfig,
        entropy_mask,
        fused_linear_policy_loss,
        group_advantages,
        linear_logprob_entropy,
    )

    OPS_SOURCE = "rubric_fast.ops"
except ImportError:  # the ops package is still being written, or partially importable
    from rubric_fast.reference import (  # noqa: F401
        PolicyLossConfig,
        entropy_mask,
        fused_linear_policy_loss,
        group_advantages,
        linear_logprob_entropy,
    )

    OPS_SOURCE = "rubric_fast.reference"

try:
    from rubric_fast.ops import truncated_importance_weight  # type: ignore[attr-defined]
except ImportError:
    from rubric_fast.reference import truncated_importance_weight  # noqa: F401

__all__ = ["OPS_SOURCE", "PolicyLossConfig", "entropy_mask", "fused_linear_policy_loss", "group_advantages",
           "linear_logprob_entropy", "truncated_importance_weight"]
