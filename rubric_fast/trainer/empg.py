"""EMPG: entropy-modulated policy gradients over the steps (assistant turns) of multi-turn rollouts.

Wang et al. 2025, "Harnessing Uncertainty: Entropy-Modulated Policy Gradients for Long-Horizon LLM Agents"
(EMPG, arXiv:2509.09265): the policy-gradient magnitude is coupled to the entropy, so confident correct
steps get small updates and uncertain steps large ones. EMPG re-scales each step's learning signal by its
uncertainty (*self-calibrating gradient scaling*) and adds a *future clarity* bonus for steps that lead to
a confident next step:

    H_t      = mean token entropy of step t (one assistant turn), from the rollout policy
    H~_t     = (H_t - min H) / (max H - min H)           min-max over every step of the batch (all ranks)
    g(H~)    = exp(-k H~) / mean_batch exp(-k H~)        (mean of g over the batch is 1)
    f(H~)    = exp(-k_f H~)
    A(i, t)  = g(H~_{i,t}) A_i + zeta f(H~_{i,t+1})      (no bonus after the last step)

with A_i the trajectory's (group) advantage; defaults k = k_f = 1, zeta = 0.1. Every token of step t gets
A(i, t): these per-token advantages go to the fused loss op as its ``advantages[N]`` unchanged; environment
tokens keep weight 0. When every step of the batch has the same entropy, H~ = 0 and g = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rubric_fast.settings import check_fields, setting

_NONNEG = dict(check=lambda v: math.isfinite(v) and v >= 0, accepts="a finite number >= 0")


@dataclass
class EMPGConfig:
    """EMPG: entropy-modulated policy gradients for multi-turn rollouts (docs/methods.md)."""

    enabled: bool = setting(False, "EMPG: scale each turn's advantage by its entropy (multi-turn rollouts)")
    k: float = setting(1.0, "self-calibrating scaling: g = exp(-k H~) / mean exp(-k H~)", **_NONNEG)
    k_f: float = setting(1.0, "future clarity: f = exp(-k_f H~)", **_NONNEG)
    zeta: float = setting(0.1, "weight of the future clarity bonus", **_NONNEG)


def check_config(c: EMPGConfig, *, multiturn: bool, key: str = "algorithm.empg") -> None:
    check_fields(c, key + ".")
    if c.enabled and not multiturn:
        raise ValueError(f"{key}.enabled: EMPG modulates the advantage per step, and a step is an assistant turn "
                         "of a multi-turn rollout; set rollout.multiturn.enabled=true")


def batch_stats(step_entropies: list[list[float]], device="cpu") -> tuple[float, float]:
    """(min, max) of every step entropy of the batch, over all ranks (inf, -inf when there is none)."""
    flat = [h for hs in step_entropies for h in hs]
    lo, hi = (min(flat), max(flat)) if flat else (math.inf, -math.inf)
    from .dist import is_distributed

    if is_distributed():
        t = torch.tensor([-lo, hi], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        lo, hi = -float(t[0]), float(t[1])
    return lo, hi


def empg_step_advantages(adv: list[float], step_entropies: list[list[float]], cfg: EMPGConfig, *,
                         device="cpu", eps: float = 1e-8) -> list[list[float]]:
    """A(i, t) for every trajectory i and step t (see the module docstring)."""
    from .dist import global_sum

    lo, hi = batch_stats(step_entropies, device)
    span = hi - lo
    norm = [[(h - lo) / span if span > eps else 0.0 for h in hs] for hs in step_entropies]
    scale = [[math.exp(-cfg.k * h) for h in hs] for hs in norm]
    total = global_sum(sum(sum(s) for s in scale), device)
    count = global_sum(sum(len(s) for s in scale), device)
    mean = total / count if count else 1.0
    out = []
    for a, hs, ss in zip(adv, norm, scale):
        out.append([ss[t] / mean * a + (cfg.zeta * math.exp(-cfg.k_f * hs[t + 1]) if t + 1 < len(hs) else 0.0)
                    for t in range(len(hs))])
    return out


def token_advantages(step_adv: list[float], turn_spans: list[list[int]], n_tokens: int) -> list[float]:
    """Per completion token: A(i, t) on the tokens of assistant turn t, 0 elsewhere (environment tokens)."""
    out = [0.0] * n_tokens
    for a, (start, end) in zip(step_adv, turn_spans):
        out[start:end] = [a] * (end - start)
    return out


def turn_entropies(token_entropy: list[float], turn_spans: list[list[int]]) -> list[float]:
    """Mean token entropy of each assistant turn (an empty turn: 0)."""
    return [sum(token_entropy[s:e]) / (e - s) if e > s else 0.0 for s, e in turn_spans]


@torch.no_grad()
def rollout_turn_entropies(model, samples, pad_id: int, device, *, temperature: float, token_budget: int) -> None:
    """Set ``completion.turn_entropy`` of every multi-turn sample from one no-grad pass of the policy as it
    sampled them (eval mode, the rollout temperature): the entropy of the sampler's distribution at every
    token (top-k / top-p aside)."""
    from rubric_fast import ops

    from .batches import collate, pack_micro_batches  # late: config.py imports this module
    from .update import token_hidden

    todo = [s for s in samples if getattr(s.completion, "turn_spans", None) and s.completion.token_ids]
    if not todo:
        return
    was_training = model.training
    model.eval()
    try:
        for mb_samples in pack_micro_batches(todo, token_budget):
            mb = collate(mb_samples, pad_id, device, mask_truncated=False, seq_offset=0)
            h, w, b = token_hidden(model, mb)
            _, ent, _ = ops.linear_logprob_entropy(h, w, mb.targets, bias=b, temperature=temperature)
            ent = ent.float().tolist()
            seq = mb.seq_index.tolist()
            for k, s in enumerate(mb_samples):
                tok_ent = [e for e, q in zip(ent, seq) if q == k]
                s.completion.turn_entropy = turn_entropies(tok_ent, s.completion.turn_spans)
    finally:
        model.train(was_training)
