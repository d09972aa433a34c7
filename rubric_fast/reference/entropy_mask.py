"""Reference entropy-selected token mask ("Beyond the 80/20 rule", Wang et al. 2025).

``entropy_mask`` is the plain single-process truth (a stable sort). ``distributed_entropy_mask`` is the
exact cross-rank selection by radix select over the order-preserving 32-bit keys of the fp32 entropies
(docs/ops-math.md): 4 all-reduces of a 256-bin histogram, one all-reduce of the count above the
threshold and one all-gather of per-rank tie counts; no rank gathers the others' entropies.
"""

from __future__ import annotations

import math

import torch


def selection_count(top_fraction: float, n_valid: int) -> int:
    if not 0.0 <= top_fraction <= 1.0 or math.isnan(top_fraction):
        raise ValueError(f"top_fraction: must be in [0, 1], got {top_fraction}")
    x = top_fraction * n_valid
    r = round(x)
    # 0.2 * 10 = 2.0000000000000004 must give 2, not 3; a tiny positive fraction still gives 1
    k = r if (r > 0 and abs(x - r) <= 1e-9 * max(1.0, x)) else math.ceil(x)
    return min(n_valid, k)


def _check(entropy, valid):
    if entropy.dim() != 1:
        raise ValueError(f"entropy: expected shape [N], got {tuple(entropy.shape)}")
    if valid.shape != entropy.shape or valid.dtype != torch.bool:
        raise ValueError(f"valid: expected a bool tensor of shape {tuple(entropy.shape)}, got {valid.dtype} {tuple(valid.shape)}")
    if bool(torch.isnan(entropy[valid]).any()):
        raise ValueError("entropy: NaN among valid tokens")


def topk_mask(entropy: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k valid tokens with the highest entropy, ties broken by lower position."""
    n = entropy.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=entropy.device)
    if k <= 0:
        return mask
    pos = torch.nonzero(valid).squeeze(1)
    vals = entropy[pos].float().double() + 0.0  # selection is on fp32 values; -0.0 == +0.0
    order = torch.sort(-vals, stable=True).indices  # stable: equal values keep position order
    mask[pos[order[:k]]] = True
    return mask


def entropy_mask(entropy: torch.Tensor, valid: torch.Tensor, top_fraction: float) -> torch.Tensor:
    _check(entropy, valid)
    return topk_mask(entropy, valid, selection_count(top_fraction, int(valid.sum())))


def float_keys(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving map of fp32 values to non-negative int64 keys in [0, 2^32)."""
    bits = (x.float() + 0.0).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # -0.0 -> +0.0
    neg = bits >= 0x80000000
    return torch.where(neg, 0xFFFFFFFF - bits, bits | 0x80000000)


def distributed_entropy_mask(entropy, valid, top_fraction, process_group=None):
    import torch.distributed as dist

    _check(entropy, valid)
    dev = entropy.device
    n_valid = torch.tensor([int(valid.sum())], dtype=torch.int64, device=dev)
    dist.all_reduce(n_valid, group=process_group)
    k = selection_count(top_fraction, int(n_valid.item()))
    if k == 0:
        return torch.zeros_like(valid)
    keys = float_keys(entropy)[valid]
    prefix, remaining = 0, k  # select the key of rank `remaining` (1-based, descending) under `prefix`
    for shift in (24, 16, 8, 0):
        high_mask = (0xFFFFFFFF << (shift + 8)) & 0xFFFFFFFF
        cand = keys[(keys & high_mask) == prefix]
        hist = torch.bincount(((cand >> shift) & 0xFF), minlength=256).to(torch.int64)
        dist.all_reduce(hist, group=process_group)
        above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # count with digit >= d
        digit = int(torch.nonzero(above >= remaining).max())
        remaining -= int(above[digit] - hist[digit])
        prefix |= digit << shift
    threshold = prefix
    all_keys = float_keys(entropy)
    greater = valid & (all_keys > threshold)
    ties = valid & (all_keys == threshold)
    tie_counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(tie_counts, ties.sum().reshape(1).to(torch.int64), group=process_group)
    rank = dist.get_rank(process_group)
    before = int(sum(int(t) for t in tie_counts[:rank]))
    take = max(0, min(remaining - before, int(tie_counts[rank])))
    tie_pos = torch.nonzero(ties).squeeze(1)[:take]
    mask = greater.clone()
    mask[tie_pos] = True
    return mask
