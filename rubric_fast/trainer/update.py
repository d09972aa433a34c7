"""The update (the loop's step 4): ``num_iterations`` passes over a step's samples, ``mini_batches`` optimizer
steps each, every micro-batch through the policy's last hidden states and the fused log-prob/loss op (never
the full logits).

    micro-batches   build_micro_batches: sequences never split; fsdp2 ranks padded to the same count
    pre-pass        old_logp_and_selection: pi_old (several iterations) and the top-entropy selection over
                    every token of every rank, before the first forward that needs them
    per optimizer   loss_normalizer (global: summed over ranks and micro-batches) ->
    step            micro_batch_backward for each micro-batch -> optimizer_step (skipped together on every
                    rank when a loss or the gradient norm is not finite)

Every function here is a collective on every rank, also on one with no samples.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable

import torch
from torch import nn

from rubric_fast import ops
from rubric_fast.trainer.lm_head import hidden_states_and_head

from .batches import MicroBatch, Sample, collate, collate_packed, pack_micro_batches, padding_free, padding_micro_batch
from .config import TrainConfig, policy_loss_config
from .dist import PolicyForward, full_tensor, global_max, global_sum, is_distributed, sync_gradients
from .models import ReferencePolicy

OnEvent = Callable[..., None]  # (event, step, rank): the run's callbacks (callbacks.py)


def token_hidden(model: nn.Module, mb: MicroBatch):
    """Hidden states at the completion positions [N, H] plus the head's weight and bias: no logits."""
    if isinstance(model, PolicyForward):  # the (possibly FSDP-sharded) root: one forward gathers everything
        return model(mb.input_ids, mb.attention_mask, mb.position_ids, mb.rows, mb.cols)
    hidden, weight, bias = hidden_states_and_head(model, mb.input_ids, mb.attention_mask, position_ids=mb.position_ids)
    return hidden[mb.rows, mb.cols], weight, bias


def make_scheduler(optimizer, cfg: TrainConfig, total_updates: int):
    o = cfg.optimization

    def factor(i: int) -> float:
        if o.warmup_steps and i < o.warmup_steps:
            return (i + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        frac = min(1.0, (i - o.warmup_steps) / max(1, total_updates - o.warmup_steps))
        return 1.0 - frac if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_micro_batches(cfg: TrainConfig, samples: list[Sample], pad_id: int, device, *,
                        strategy: str) -> list[list[MicroBatch]]:
    """The mini-batches (one optimizer step each) as lists of micro-batches packed by the token budget."""
    a, o = cfg.algorithm, cfg.optimization
    order = list(range(len(samples)))
    random.Random(cfg.seed + len(samples)).shuffle(order)
    n_mini = o.mini_batches
    minis = [[samples[i] for i in order[j::n_mini]] for j in range(n_mini)]
    packed = padding_free(cfg)

    def build(mb: list[Sample], k: int) -> MicroBatch:
        if packed:
            return collate_packed(mb, device, mask_truncated=a.mask_truncated_completions, seq_offset=k * 100_000)
        return collate(mb, pad_id, device, mask_truncated=a.mask_truncated_completions, seq_offset=k * 100_000)

    mini_mbs = [[build(mb, k) for k, mb in enumerate(pack_micro_batches(mini, o.tokens_per_micro_batch, packed=packed))]
                if mini else [] for mini in minis]
    if strategy == "fsdp2":  # every FSDP forward/backward is a collective: the same count on every rank
        for mbs in mini_mbs:
            mbs.extend(padding_micro_batch(pad_id, device) for _ in range(global_max(len(mbs), device) - len(mbs)))
    return mini_mbs


def old_logp_and_selection(cfg: TrainConfig, model: nn.Module, mini_mbs: list[list[MicroBatch]],
                           device) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """A no-grad pre-pass when the loss needs something before its first forward: pi_old with several
    iterations (it must stay fixed), the top-entropy selection (one over all tokens of all micro-batches and
    ranks). Returns ({id(mb): old log-probs}, {id(mb): entropy mask}); both empty when neither is needed."""
    a = cfg.algorithm
    fraction = a.policy_loss.top_entropy_fraction
    old_cache: dict[int, torch.Tensor] = {}
    ent_mask_cache: dict[int, torch.Tensor] = {}
    if a.num_iterations == 1 and fraction is None:
        return old_cache, ent_mask_cache
    with torch.no_grad():
        ents, valids, keys = [], [], []
        for mbs in mini_mbs:
            for mb in mbs:
                h, w, b = token_hidden(model, mb)
                lp, ent, _ = ops.linear_logprob_entropy(h, w, mb.targets, bias=b, temperature=cfg.rollout.temperature)
                old_cache[id(mb)] = lp.detach()
                ents.append(ent)
                valids.append(mb.loss_weight != 0)
                keys.append(id(mb))
        if fraction is not None and (ents or is_distributed()):  # a collective: every rank
            if not ents:
                ents = [torch.zeros(0, device=device)]
                valids, keys = [torch.zeros(0, dtype=torch.bool, device=device)], [None]
            pg = torch.distributed.group.WORLD if is_distributed() else None
            sel = ops.entropy_mask(torch.cat(ents), torch.cat(valids), fraction, process_group=pg)
            for k, piece in zip(keys, torch.split(sel, [e.numel() for e in ents])):
                ent_mask_cache[k] = piece
    return old_cache, ent_mask_cache


def loss_normalizer(cfg: TrainConfig, mbs: list[MicroBatch], device) -> float:
    """The loss's denominator for one optimizer step, the same on every rank and micro-batch (exact
    accumulation): the global token count, the global sequence count, or Dr. GRPO's constant."""
    n_tok = global_sum(sum(float(mb.loss_weight.sum()) for mb in mbs), device)
    n_seq = global_sum(sum(int(torch.unique(mb.seq_index[mb.loss_weight != 0]).numel()) for mb in mbs), device)
    aggregation = cfg.algorithm.policy_loss.aggregation
    if aggregation == "token_mean":
        return n_tok
    if aggregation == "constant":
        return cfg.rollout.max_new_tokens * n_seq  # Dr. GRPO: a constant per (global) sequence
    return n_seq


class UpdateStats:
    """Sums over the micro-batches of the update, weighted by their loss tokens."""

    def __init__(self):
        self.out: dict[str, Any] = {"nonfinite": False, "updates": 0, "tokens": 0, "loss_tokens": 0.0, "loss": 0.0,
                                    "stats": {}, "entropy": 0.0, "grad_norm": float("nan"), "is_weight": 0.0}
        self.stat_sums: dict[str, float] = {}
        self.entropy_sum = 0.0
        self.is_sum = 0.0

    def add(self, mb: MicroBatch, loss, stats, ent, is_weight) -> None:
        tw = float(mb.loss_weight.sum())
        self.out["loss"] += float(loss.detach())
        self.out["tokens"] += mb.n_tokens
        self.out["loss_tokens"] += tw
        for name, v in stats._asdict().items():
            self.stat_sums[name] = self.stat_sums.get(name, 0.0) + float(v.detach()) * tw
        if ent is not None:
            self.entropy_sum += float((ent.detach() * (mb.loss_weight != 0)).sum())
        if is_weight is not None:
            self.is_sum += float((is_weight * (mb.loss_weight != 0)).sum())

    def result(self, is_cap: float | None) -> dict[str, Any]:
        out = self.out
        lt = max(out["loss_tokens"], 1.0)
        out["stats"] = {k: v / lt for k, v in self.stat_sums.items()}
        out["entropy"] = self.entropy_sum / lt
        out["is_weight"] = self.is_sum / lt if is_cap is not None else float("nan")
        out["loss"] /= max(1, out["updates"])
        return out


def micro_batch_backward(cfg: TrainConfig, model: nn.Module, reference: ReferencePolicy | None, mb: MicroBatch,
                         loss_cfg, old_cache: dict, ent_mask_cache: dict, stats: UpdateStats) -> bool:
    """One micro-batch: forward to the hidden states, the fused loss, backward. Returns whether the loss was
    finite (no early exit: with fsdp2 the backward is a collective; the step is skipped on every rank)."""
    a = cfg.algorithm
    temperature = cfg.rollout.temperature
    h, w, b = token_hidden(model, mb)
    if id(mb) in old_cache:
        old = old_cache[id(mb)]
    elif a.is_cap is not None:  # the IS weight needs pi_old before the loss: head only, no grad
        with torch.no_grad():
            old, _, _ = ops.linear_logprob_entropy(h.detach(), w.detach(), mb.targets,
                                                   bias=None if b is None else b.detach(), temperature=temperature,
                                                   return_entropy=False)
    else:
        old = None  # num_iterations == 1: on-policy, the fused op uses its own log-probs
    is_weight = ops.truncated_importance_weight(old, mb.sampler_logp, a.is_cap) if a.is_cap is not None else None
    ref = None
    if reference is not None:
        with torch.no_grad(), reference.context():
            # lora_base: the policy itself with adapters off, through the (sharded) root
            ref_model = model if reference.mode == "lora_base" else reference.module()
            rh, rw, rb = token_hidden(ref_model, mb)
            ref, _, _ = ops.linear_logprob_entropy(rh, rw, mb.targets, bias=rb, temperature=temperature,
                                                   return_entropy=False)
    loss, loss_stats, _, ent = ops.fused_linear_policy_loss(
        h, w, mb.targets, old, mb.advantages, mb.loss_weight, ref_logp=ref, is_weight=is_weight,
        seq_index=mb.seq_index, entropy_mask=ent_mask_cache.get(id(mb)), config=loss_cfg, bias=b,
        temperature=temperature)
    finite = bool(torch.isfinite(loss))
    loss.backward()  # the normalizer is global: the per-rank gradients add up to the batch gradient
    stats.add(mb, loss, loss_stats, ent, is_weight)
    return finite


def optimizer_step(cfg: TrainConfig, params: list, optimizer, scheduler, *, strategy: str,
                   stats: UpdateStats) -> bool:
    """Gradients synchronised (ddp), clipped, one optimizer step; False (and no step) when the norm is not
    finite."""
    o = cfg.optimization
    if strategy == "ddp":  # fsdp2 reduce-scattered the gradients during backward
        sync_gradients(params, cfg.distributed.bucket_mb)
    gn = torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip is not None else float("inf"))
    gn = full_tensor(gn)
    if not torch.isfinite(gn):
        return False
    stats.out["grad_norm"] = float(gn)
    optimizer.step()
    scheduler.step()
    stats.out["updates"] += 1
    return True


def update(cfg: TrainConfig, model: nn.Module, reference: ReferencePolicy | None, optimizer, scheduler,
           samples: list[Sample], pad_id: int, device, *, strategy: str = "ddp", step: int = 0,
           rank: int = 0, on_event: OnEvent | None = None) -> dict[str, Any]:
    """``num_iterations`` passes over the samples, ``mini_batches`` optimizer steps each; returns stats.

    ``model`` is the :class:`PolicyForward` root (FSDP2-sharded with ``strategy="fsdp2"``); a collective
    call on every rank, also on one with no samples. ``on_event("backward", step, rank)`` after the first
    micro-batch's backward of each optimizer step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    mini_mbs = build_micro_batches(cfg, samples, pad_id, device, strategy=strategy)
    old_cache, ent_mask_cache = old_logp_and_selection(cfg, model, mini_mbs, device)
    stats = UpdateStats()
    for _ in range(cfg.algorithm.num_iterations):
        for mbs in mini_mbs:
            norm = loss_normalizer(cfg, mbs, device)
            if norm <= 0:
                continue
            loss_cfg = policy_loss_config(cfg, normalizer=norm)
            optimizer.zero_grad(set_to_none=True)
            bad = False
            for i_mb, mb in enumerate(mbs):
                bad = not micro_batch_backward(cfg, model, reference, mb, loss_cfg, old_cache, ent_mask_cache,
                                               stats) or bad
                if i_mb == 0 and on_event is not None:
                    on_event("backward", step, rank)
            if global_sum(float(bad), device) > 0 or not optimizer_step(cfg, params, optimizer, scheduler,
                                                                        strategy=strategy, stats=stats):
                optimizer.zero_grad(set_to_none=True)  # every rank skips together
                stats.out["nonfinite"] = True
                return stats.out
    return stats.result(cfg.algorithm.is_cap)
