"""OREAL-style sample weighting: separate loss factors for positive and negative samples, and best/worst
selection (pure functions).

Lyu et al. 2025, "Exploring the Limit of Outcome Reward for Learning Mathematical Reasoning" (OREAL,
arXiv:2502.06781): behaviour cloning on the positive samples of best-of-N sampling is enough to learn the
KL-regularized optimal policy in binary-feedback environments, and the negative samples' rewards must be
reshaped so that their gradients stay consistent with the positives'; the two parts of the loss carry their
own factors (``positive_loss_factor``, ``negative_loss_factor`` in the authors' xtuner implementation).

Here the group advantages A_i are computed as usual (every valid member is part of the baseline), then

    A_i <- positive_loss_factor * A_i   if A_i > 0
    A_i <- negative_loss_factor * A_i   if A_i < 0

and, with ``best_worst_only``, only one best (highest reward, first on ties) and one worst (lowest reward, first
on ties) member of each group is trained. The factors are folded into the advantages, not into
``loss_weight``: every policy loss here is linear in a positive scaling of A (PPO clip: min(rho cA,
clip(rho) cA) = c min(rho A, clip(rho) A) for c > 0; CISPO, SAPO, GSPO alike), so scaling A scales exactly the
policy-gradient term of that sample, while ``loss_weight`` also multiplies the KL and entropy terms and sets
the token-mean normalizer (the number of tokens with weight != 0), which must not change.
"""

from __future__ import annotations

from rubric_fast.settings import check_fields


def scale_advantages(adv: list[float], positive_factor: float, negative_factor: float) -> list[float]:
    return [a * positive_factor if a > 0 else a * negative_factor if a < 0 else a for a in adv]


def best_worst_keep(rewards: list[float | None], group_ids: list[int]) -> list[bool]:
    """Per group: keep the first member with the highest reward and the first with the lowest (one member
    when they coincide, i.e. when every valid reward of the group is equal); missing rewards are never kept."""
    best: dict[int, int] = {}
    worst: dict[int, int] = {}
    for i, (r, g) in enumerate(zip(rewards, group_ids)):
        if r is None:
            continue
        if g not in best or r > rewards[best[g]]:
            best[g] = i
        if g not in worst or r < rewards[worst[g]]:
            worst[g] = i
    kept = set(best.values()) | set(worst.values())
    return [i in kept for i in range(len(rewards))]


def check_config(a, key: str = "algorithm") -> None:
    """ValueError naming the key (``a`` is the trainer's AlgorithmConfig)."""
    check_fields(a, key + ".")  # the factors' own checks (AlgorithmConfig)
    if a.positive_loss_factor == 0 and a.negative_loss_factor == 0:
        raise ValueError(f"{key}.positive_loss_factor: both loss factors are 0, nothing would be learned")
