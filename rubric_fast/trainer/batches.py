"""Samples and the micro-batches of the update: padded rows or padding-free packed rows, from the samples of
one step (the loop's step 4). Plain data in, tensors out; no model, no optimizer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from rubric_fast.rubric import Rubric

from . import multiturn
from .config import TrainConfig
from .rollout import Completion


@dataclass
class Sample:
    group_id: int
    rubric: Rubric
    prompt_ids: list[int]          # the original prompt: the loss is always computed on it
    completion: Completion         # generated tokens, sampler log-probs (under the possibly scaffolded prompt)
    policy_version: int
    reward: float | None = None
    verdicts: list[Any] = field(default_factory=list)
    advantage: float = 0.0
    token_advantages: list[float] | None = None  # per completion token, when a method sets them (EMPG)
    guard_reason: str | None = None  # the guard judged it junk, and why
    errors: list[str] = field(default_factory=list)  # why its judgement failed (reward None)
    extras: dict[str, Any] = field(default_factory=dict)  # per-method data (docs/methods.md), e.g. calibration


@dataclass
class RolloutBatch:
    step: int
    policy_version: int
    data_position: dict[str, int]  # where the stream stood before this batch (resume regenerates it)
    samples: list[Sample]
    group_ids: list[int]
    rollout_time: float
    rollout_tokens: int


def batch_to_state(b: RolloutBatch, rubric_index: dict[int, int]) -> dict[str, Any]:
    """A generated, not yet trained batch as plain data for the checkpoint (rewards are re-scored)."""
    return {"step": b.step, "policy_version": b.policy_version, "data_position": b.data_position,
            "group_ids": b.group_ids, "rollout_time": b.rollout_time, "rollout_tokens": b.rollout_tokens,
            "samples": [{"group_id": s.group_id, "rubric": rubric_index[id(s.rubric)], "prompt_ids": s.prompt_ids,
                         "policy_version": s.policy_version, "completion": dataclasses.asdict(s.completion)}
                        for s in b.samples]}


def batch_from_state(d: dict[str, Any], rubrics: list[Rubric]) -> RolloutBatch:
    samples = [Sample(s["group_id"], rubrics[s["rubric"]], s["prompt_ids"],
                      multiturn.completion_from_dict(s["completion"]), s["policy_version"]) for s in d["samples"]]
    return RolloutBatch(d["step"], d["policy_version"], d["data_position"], samples, d["group_ids"],
                        d["rollout_time"], d["rollout_tokens"])


# ------------------------------------------------------------------------------------------------ micro-batches
def pack_micro_batches(samples: list[Sample], token_budget: int, *, packed: bool = False) -> list[list[Sample]]:
    """Greedy packing, longest first, so that (sequences x longest length) <= token_budget per micro-batch;
    ``packed`` (padding-free rows): first-fit decreasing, so that the sum of lengths <= token_budget.
    A sequence longer than the budget gets a micro-batch of its own; sequences are never split."""
    order = sorted(samples, key=lambda s: len(s.prompt_ids) + len(s.completion.token_ids), reverse=True)
    if packed:
        bins: list[tuple[int, list[Sample]]] = []  # (tokens, samples)
        for s in order:
            n = len(s.prompt_ids) + len(s.completion.token_ids)
            for i, (used, members) in enumerate(bins):
                if used + n <= token_budget:
                    members.append(s)
                    bins[i] = (used + n, members)
                    break
            else:
                bins.append((n, [s]))
        return [members for _, members in bins]
    batches: list[list[Sample]] = []
    cur: list[Sample] = []
    cur_max = 0
    for s in order:
        n = len(s.prompt_ids) + len(s.completion.token_ids)
        if cur and (len(cur) + 1) * max(cur_max, n) > token_budget:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(s)
        cur_max = max(cur_max, n)
    if cur:
        batches.append(cur)
    return batches


@dataclass
class MicroBatch:
    input_ids: torch.Tensor        # [B, T] right-padded prompt + completion; packed: [1, sum of lengths]
    attention_mask: torch.Tensor | None  # [B, T]; packed: None (the sequences are told apart by position_ids)
    position_ids: torch.Tensor     # [B, T]; packed: 0..len-1 for each sequence in turn
    rows: torch.Tensor             # [N] batch row of each completion token
    cols: torch.Tensor             # [N] position whose hidden state predicts the token
    targets: torch.Tensor          # [N]
    advantages: torch.Tensor       # [N]
    loss_weight: torch.Tensor      # [N]
    seq_index: torch.Tensor        # [N]
    sampler_logp: torch.Tensor     # [N]
    n_tokens: int                  # real (unpadded) tokens in the forward


def token_advantages_and_weights(s: Sample, weight: float) -> tuple[list[float], list[float]]:
    """Per completion token: the advantage (the sample's, or its per-token advantages) and the loss weight
    (``weight``, times 0 on the environment's tokens of a multi-turn conversation)."""
    n = len(s.completion.token_ids)
    adv = s.token_advantages if s.token_advantages is not None else [s.advantage] * n
    mask = getattr(s.completion, "loss_mask", None)
    return adv, ([weight * m for m in mask] if mask is not None else [weight] * n)


def collate(samples: list[Sample], pad_id: int, device, *, mask_truncated: bool, seq_offset: int) -> MicroBatch:
    width = max(len(s.prompt_ids) + len(s.completion.token_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    rows, cols, tgts, adv, w, seq, slp = [], [], [], [], [], [], []
    for b, s in enumerate(samples):
        p, c = s.prompt_ids, s.completion.token_ids
        ids[b, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[b, :len(p) + len(c)] = 1
        weight = 0.0 if (mask_truncated and not s.completion.finished) else 1.0
        tok_adv, tok_w = token_advantages_and_weights(s, weight)
        for j, tok in enumerate(c):
            rows.append(b)
            cols.append(len(p) - 1 + j)
            tgts.append(tok)
            adv.append(tok_adv[j])
            w.append(tok_w[j])
            seq.append(seq_offset + b)
            slp.append(s.completion.sampler_logp[j])
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)
    return MicroBatch(ids.to(device), mask.to(device), pos.to(device), t(rows, torch.long), t(cols, torch.long),
                      t(tgts, torch.long), t(adv, torch.float32), t(w, torch.float32), t(seq, torch.long),
                      t(slp, torch.float32), int(mask.sum()))


def collate_packed(samples: list[Sample], device, *, mask_truncated: bool, seq_offset: int) -> MicroBatch:
    """One padding-free row: the sequences back to back, positions restarting at 0 for each.

    With no attention mask, transformers reads the sequence boundaries from ``position_ids`` (a position that
    does not follow its predecessor starts a new sequence): flash-attention 2 runs varlen over the
    cumulative lengths; sdpa and eager get a block-diagonal causal mask. Either way no token attends across
    sequences and RoPE sees each sequence's own positions, so every hidden state equals the padded path's."""
    ids: list[int] = []
    pos: list[int] = []
    cols, tgts, adv, w, seq, slp = [], [], [], [], [], []
    for b, s in enumerate(samples):
        p, c = s.prompt_ids, s.completion.token_ids
        start = len(ids)
        ids += p + c
        pos += range(len(p) + len(c))
        weight = 0.0 if (mask_truncated and not s.completion.finished) else 1.0
        tok_adv, tok_w = token_advantages_and_weights(s, weight)
        for j, tok in enumerate(c):
            cols.append(start + len(p) - 1 + j)
            tgts.append(tok)
            adv.append(tok_adv[j])
            w.append(tok_w[j])
            seq.append(seq_offset + b)
            slp.append(s.completion.sampler_logp[j])
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)
    return MicroBatch(t([ids], torch.long), None, t([pos], torch.long), t([0] * len(cols), torch.long),
                      t(cols, torch.long), t(tgts, torch.long), t(adv, torch.float32), t(w, torch.float32),
                      t(seq, torch.long), t(slp, torch.float32), len(ids))


def padding_free(cfg: TrainConfig) -> bool:
    """Whether update micro-batches are packed rows (``optimization.padding_free``, see config.py). Only where
    transformers reads packed sequences from position_ids (masking_utils, transformers 5): older versions
    would let packed sequences attend to each other."""
    from .models import resolve_attn_implementation

    mode = cfg.optimization.padding_free
    if mode is False or (mode == "auto" and resolve_attn_implementation(cfg.model.attn_implementation)
                           != "flash_attention_2"):
        return False
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def padding_micro_batch(pad_id: int, device) -> MicroBatch:
    """A one-token micro-batch with loss weight 0: fsdp2 ranks with fewer micro-batches run these, because
    every FSDP forward and backward is a collective that all ranks must join (it adds nothing to the loss)."""
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)
    return MicroBatch(t([[pad_id, pad_id]], torch.long), t([[1, 1]], torch.long), t([[0, 1]], torch.long),
                      t([0], torch.long), t([0], torch.long), t([pad_id], torch.long), t([0.0], torch.float32),
                      t([0.0], torch.float32), t([0], torch.long), t([0.0], torch.float32), 0)
