"""Pairwise rubric judging: the comparison plan of a group, order-consistent outcomes, Bradley-Terry utilities
(pure functions; the judges are in rubric_fast.judges.pairwise, the trainer's scorer in
rubric_fast.trainer.pairwise_scorer).

Liu et al. 2025, "OpenRubrics: Towards Scalable Synthetic Rubric Generation for Reward Modeling and LLM
Alignment" (Rubric-RM, arXiv:2510.07743): a rubric-conditioned judge compares two responses, the rubric's
*hard rules* acting as gates and its *principles* as preferences, and answers which one is better.

Within a group of G responses:

* plan: ``all_pairs`` (G(G-1)/2 comparisons) or ``round_robin`` with k comparisons per response (a circulant
  graph over a seeded permutation of the members: offsets 1..floor(k/2) both ways, plus the opposite
  member when k is odd and G even; k >= G-1 is all pairs);
* each comparison is asked in both orders; the outcome is kept only when both orders name the same winner
  (or both say tie); a failed call or an order-inconsistent pair is *missing data*, never a loss;
* Bradley-Terry: P(i beats j) = sigmoid(theta_i - theta_j); a tie counts as half a win for each; theta is
  the maximizer of

      sum_{kept (i, j, s)} [s log sigmoid(theta_i - theta_j) + (1 - s) log sigmoid(theta_j - theta_i)]
          - (prior / 2) sum_i theta_i^2

  (Newton's method; the weak Gaussian prior keeps theta finite when a response won all its comparisons and
  fixes the scale of disconnected parts of the graph; prior = 0 is the plain MLE);
* reward of member i: its expected win rate against the other rated members,
  ``r_i = mean_{j != i} sigmoid(theta_i - theta_j)`` in [0, 1]; a member with no kept comparison has no
  reward (None: excluded from its group's baseline).
"""

from __future__ import annotations

import math
import random

PLANS = ("all_pairs", "round_robin")


def comparison_plan(n: int, plan: str = "all_pairs", k: int = 2, seed: int = 0) -> list[tuple[int, int]]:
    """The pairs (i, j), i != j, compared within a group of n members."""
    if n < 2:
        raise ValueError(f"pairwise judging needs groups of at least 2 responses, got {n}")
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {', '.join(PLANS)}; got {plan!r}")
    if plan == "all_pairs" or k >= n - 1:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    if k < 1:
        raise ValueError(f"comparisons per response must be >= 1, got {k}")
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    edges: set[tuple[int, int]] = set()
    offsets = list(range(1, k // 2 + 1))
    if k % 2 == 1 and n % 2 == 0:
        offsets.append(n // 2)
    for d in offsets:
        for p in range(n):
            a, b = perm[p], perm[(p + d) % n]
            edges.add((min(a, b), max(a, b)))
    return sorted(edges)


def consistent_outcome(first_order: str | None, swapped_order: str | None) -> float | None:
    """The score of the member shown first in ``first_order`` (1 win, 0 loss, 0.5 tie) from the two answers
    ``"A"`` / ``"B"`` / ``"tie"`` (None = failed); None when either failed or they disagree."""
    if first_order is None or swapped_order is None:
        return None
    s1 = {"A": 1.0, "B": 0.0, "tie": 0.5}[first_order]
    s2 = {"A": 0.0, "B": 1.0, "tie": 0.5}[swapped_order]  # in the swapped order, "A" is the other member
    return s1 if s1 == s2 else None


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (tiny symmetric positive definite systems)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for cc in range(c, n + 1):
                m[r][cc] -= f * m[c][cc]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][cc] * x[cc] for cc in range(r + 1, n))) / m[r][r]
    return x


def bradley_terry(n: int, results: list[tuple[int, int, float]], *, prior: float = 0.1, max_iter: int = 100,
                  tol: float = 1e-10) -> list[float | None]:
    """theta per member (None for a member without any result). ``results``: (i, j, s) with s the score of i
    against j (1, 0 or 0.5); a pair may appear several times."""
    rated = sorted({i for i, _, _ in results} | {j for _, j, _ in results})
    if not rated:
        return [None] * n
    idx = {m: t for t, m in enumerate(rated)}
    theta = [0.0] * len(rated)
    if prior <= 0:  # the plain MLE is defined up to a constant: fix the last rated member at 0
        free = len(rated) - 1
    else:
        free = len(rated)
    for _ in range(max_iter):
        grad = [-prior * t for t in theta]
        hess = [[(prior if r == c else 0.0) for c in range(len(rated))] for r in range(len(rated))]
        for i, j, s in results:
            a, b = idx[i], idx[j]
            p = _sigmoid(theta[a] - theta[b])
            grad[a] += s - p
            grad[b] -= s - p
            w = p * (1.0 - p)
            hess[a][a] += w
            hess[b][b] += w
            hess[a][b] -= w
            hess[b][a] -= w
        if free == 0:
            break
        step = _solve([row[:free] for row in hess[:free]], grad[:free])
        for t in range(free):
            theta[t] += step[t]
        if max(abs(x) for x in step) < tol:
            break
    out: list[float | None] = [None] * n
    for m, t in idx.items():
        out[m] = theta[t]
    return out


def win_rate_rewards(theta: list[float | None]) -> list[float | None]:
    """r_i = mean over the other rated members j of sigmoid(theta_i - theta_j); None where theta is None
    (a lone rated member gets 0.5)."""
    rated = [t for t in theta if t is not None]
    out: list[float | None] = []
    for t in theta:
        if t is None:
            out.append(None)
        elif len(rated) < 2:
            out.append(0.5)
        else:
            out.append((sum(_sigmoid(t - u) for u in rated) - 0.5) / (len(rated) - 1))
    return out


def pairwise_rewards(n: int, outcomes: dict[tuple[int, int], float | None], *,
                     prior: float = 0.1) -> tuple[list[float | None], list[float | None]]:
    """(rewards, theta) of a group from its consistent outcomes ((i, j) -> score of i, None = missing)."""
    results = [(i, j, s) for (i, j), s in outcomes.items() if s is not None]
    theta = bradley_terry(n, results, prior=prior)
    return win_rate_rewards(theta), theta
