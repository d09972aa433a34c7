"""The train loop, top to bottom.

    for each step:
        1. rollout   prompts -> G completions each (hf generate); each finished batch of completions is
                     submitted to the scorer at once. With ``rollout.overlap`` the batch of step k+1 is
                     generated while step k's judgements are still running (a queue of depth 2).
        2. rewards   wait for the step's groups; samples older than ``max_staleness`` policy versions are
                     dropped and counted.
        3. advantages ops.group_advantages per group (missing rewards excluded); groups with no signal
                     (every advantage 0) are dropped.
        4. update    micro-batches packed by a padded-token budget -> the policy's last hidden states
                     (never the full logits) -> ops.fused_linear_policy_loss -> backward; one optimizer step
                     per mini-batch, ``num_iterations`` passes.
        5. log, checkpoint.

Log-prob conventions: the loss's log-probs use the rollout temperature (TRL convention). ``old_logp`` is
the policy at the start of the update: with ``num_iterations == 1`` it equals ``logp.detach()``, which the
fused op takes from its own forward (``old_logp=None``); only the truncated importance weight needs it
before the loss, and then it comes from the same hidden states (a no-grad pass through the head only).
With several iterations a no-grad pre-pass computes it before the first one. The sampler's log-probs
enter only through the truncated importance weight ``min(pi_old / pi_sampler, is_cap)`` (stale samples,
top-p, rubric scaffolds).

Several processes (torchrun, see ``dist.py`` for the ddp and fsdp2 strategies): ``data.prompts_per_step``
is global and each rank samples and scores its own slice of the prompts (a group never spans ranks);
every loss normalizer (token or sequence count) is summed over ranks and over the micro-batches of the
optimizer step with ``dist.global_sum``, and the top-entropy selection is one ``ops.entropy_mask`` over all
tokens of all ranks and micro-batches, so the per-rank gradients add up to the gradient of the whole batch.
Sampling uses a per-rank seed (``seed + rank``); the initial weights are rank 0's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rubric_fast import ops
from rubric_fast.trainer.lm_head import hidden_states_and_head
from rubric_fast.rubric import Rubric, load_rubrics
from rubric_fast.scoring.scorer import rollout_errors, summarize_errors

from . import calibration, empg, multiturn, oreal, reference_update, refine
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_sharded,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import ConfigError, TrainConfig, config_to_dict, policy_loss_config
from .dist import (
    DistInfo,
    PolicyForward,
    broadcast_parameters,
    destroy_distributed,
    full_tensor,
    global_max,
    global_sum,
    init_distributed,
    is_distributed,
    kill_point,
    set_sharded_state,
    shard_fsdp2,
    sharded_state,
    sync_gradients,
)
from .interrupt import SIGNALS, Interrupted
from .models import ReferencePolicy, check_chat_template, load_policy, load_tokenizer
from .pairwise_scorer import make_pairwise_scorer
from .rewards import ScoredCompletion, make_scorer
from .rollout import Completion, make_engine
from .rundir import os_error_text, prepare_run_dir


class TrainingStopped(RuntimeError):
    """The run cannot continue (e.g. too many non-finite losses in a row)."""


# ------------------------------------------------------------------------------------------------ data
class PromptStream:
    """Endless, epoch-shuffled walk over the rubrics; identical order on every rank, each rank its slice."""

    def __init__(self, rubrics: list[Rubric], *, seed: int, shuffle: bool):
        self.rubrics, self.seed, self.shuffle = rubrics, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.rubrics)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, pos: dict[str, int]) -> None:
        self.epoch, self.index = pos["epoch"], pos["index"]
        self._order = self._make_order()

    def take(self, n_global: int, rank: int, n_local: int) -> list[Rubric]:
        """The next ``n_global`` prompts of the stream (the same on every rank); this rank's ``n_local``."""
        out = []
        for _ in range(n_global):
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.rubrics[self._order[self.index]])
            self.index += 1
        return out[rank * n_local:(rank + 1) * n_local]


# ------------------------------------------------------------------------------------------------ samples
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


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in messages) + "\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def scaffold_messages(rubric: Rubric, share: float) -> list[dict[str, str]]:
    """RuscaRL: the first round(share * n) criteria of the rubric as a system message before the prompt."""
    k = round(share * len(rubric.criteria))
    if k <= 0:
        return rubric.prompt
    lines = "; ".join(c.text for c in rubric.criteria[:k])
    return [{"role": "system", "content": f"Rubric: {lines}"}] + list(rubric.prompt)


def scaffold_share(i: int, n: int, step: int, max_steps: int, midpoint: float, steepness: float) -> float:
    """Share of criteria shown to member i of a group of n: (n-1-i)/(n-1), times a decaying sigmoid."""
    progress = step / max(1, max_steps)
    schedule = 1.0 / (1.0 + math.exp(steepness * (progress - midpoint)))
    return (n - 1 - i) / max(1, n - 1) * schedule


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


def token_hidden(model: nn.Module, mb: MicroBatch):
    """Hidden states at the completion positions [N, H] plus the head's weight and bias: no logits."""
    if isinstance(model, PolicyForward):  # the (possibly FSDP-sharded) root: one forward gathers everything
        return model(mb.input_ids, mb.attention_mask, mb.position_ids, mb.rows, mb.cols)
    hidden, weight, bias = hidden_states_and_head(model, mb.input_ids, mb.attention_mask, position_ids=mb.position_ids)
    return hidden[mb.rows, mb.cols], weight, bias


def push_weights(engine, policy: nn.Module) -> None:
    """The policy's weights into a separate inference engine (vllm); a failure stops the run, because the next
    rollouts would silently come from stale weights. A no-op for the hf engine, which samples the policy itself."""
    if not hasattr(engine, "after_update"):
        return
    from .vllm_engine import EngineError

    t0 = time.perf_counter()
    try:
        engine.after_update(policy)
    except EngineError as exc:
        raise TrainingStopped(str(exc)) from None
    engine.push_seconds = time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ setup helpers
def pick_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


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


def make_logger(cfg: TrainConfig, info: DistInfo, purge_step: int | None = None):
    from .logger import MetricsLogger

    return MetricsLogger(cfg.logging.run_dir, is_main=info.is_main, tensorboard=cfg.logging.tensorboard,
                         progress_total=cfg.max_steps if cfg.logging.progress else None, purge_step=purge_step)


def load_data(cfg: TrainConfig) -> list[Rubric]:
    """The rubric dataset, refused (one line naming ``data.path``) when unreadable or when one of its criteria
    needs a verifier that the configured judge cannot grade."""
    from rubric_fast.rubric import RubricError
    from rubric_fast.scoring.config import check_judge_coverage

    path = cfg.data.path
    try:
        rubrics = load_rubrics(path, cfg.data.format)
    except FileNotFoundError:
        raise ConfigError(f"data.path: no such file: {path}") from None
    except RubricError as exc:
        raise ConfigError(f"data.path: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data.path: {path} is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"data.path: cannot read {path}: {exc.strerror or exc}") from None
    if cfg.data.split is not None:  # e.g. train, leaving the held_out prompts to the evaluation
        from .evaluate import select_split

        try:
            rubrics = select_split(rubrics, cfg.data.split, key="data.split", path=path)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    try:
        check_judge_coverage(rubrics, cfg.judge)
    except ValueError as exc:
        raise ConfigError(f"data.path: {exc}") from None
    try:
        if cfg.reward.calibration.enabled:
            calibration.check_dataset(cfg.reward.calibration, rubrics)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return rubrics


def claim_run_dir(cfg: TrainConfig, info: DistInfo, run_dir: Path, ckpt_dir: Path, device, say) -> int:
    """Rank 0 checks, refuses, replaces or cuts back the run directory (see rundir.py); every rank learns
    the outcome, so all stop together. Returns the step the run starts from."""
    problem, start = None, 0
    if info.is_main:
        try:
            start = prepare_run_dir(run_dir, ckpt_dir, resume=cfg.checkpoint.resume,
                                    overwrite=cfg.logging.overwrite, say=say)
        except (ConfigError, CheckpointError) as exc:
            problem = exc
    if global_max(int(problem is not None), device):
        raise problem if problem is not None else ConfigError("logging.run_dir: refused on rank 0 (see its message)")
    return start


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class TrainResult:
    steps: int
    rewards: list[float]           # mean reward per trained step (NaN when no reward was valid)
    run_dir: str
    stale_dropped: int = 0
    nan_steps: int = 0


def train(cfg: TrainConfig) -> TrainResult:
    """Run the config to ``max_steps`` (resuming when a checkpoint says so); see the module docstring."""
    threads_before = torch.get_num_threads()
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads_before)  # cpu_threads is for this run, not for the caller's process


def _train(cfg: TrainConfig) -> TrainResult:
    own_group = not is_distributed()
    info = init_distributed(cfg.distributed.backend, cfg.distributed.timeout_s)
    result = _train_ranks(cfg, info)
    if own_group:
        destroy_distributed()  # only after a clean end: after a failure the other ranks may be gone
    return result


def _train_ranks(cfg: TrainConfig, info: DistInfo) -> TrainResult:
    if cfg.data.prompts_per_step % info.world_size:
        raise ConfigError(f"data.prompts_per_step: got {cfg.data.prompts_per_step}; it is the global number of "
                          f"prompts per step and must be a multiple of the world size ({info.world_size})")
    # one process: nothing to shard, the ddp path is the plain single-device path
    strategy = cfg.distributed.strategy if info.world_size > 1 else "ddp"
    device = pick_device(cfg.device, info)
    if device.type == "cpu" and cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)  # tiny models: more threads only add synchronisation
    say = (lambda msg: print(f"[rubric_fast] {msg}", file=sys.stderr)) if info.is_main else (lambda msg: None)
    run_dir = Path(cfg.logging.run_dir)
    ckpt_dir = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
    # ---- before anything is written: the data and what the judge can grade, then the run directory
    rubrics = load_data(cfg)
    start_step = claim_run_dir(cfg, info, run_dir, ckpt_dir, device, say)
    try:
        log = make_logger(cfg, info, purge_step=start_step + 1 if start_step else None)
    except OSError as exc:
        raise ConfigError(f"logging.run_dir: {os_error_text(exc, run_dir)}") from None
    closers: list = []  # the scorer, once built
    try:
        return _train_run(cfg, info, strategy, device, run_dir, ckpt_dir, rubrics, log, say, closers)
    finally:
        for c in reversed(closers):
            c.close()
        log.close()


def _train_run(cfg: TrainConfig, info: DistInfo, strategy: str, device: torch.device, run_dir: Path,
               ckpt_dir: Path, rubrics: list[Rubric], log, say, closers: list) -> TrainResult:
    seed_everything(cfg.seed)  # identical initial weights on every rank; sampling gets a per-rank seed below
    say(f"ops backends: {', '.join(ops.available_backends())}; device: {device}; world size {info.world_size}"
        + (f", strategy {strategy}" if info.world_size > 1 else ""))

    # ---- model, reference, optimizer
    tokenizer = load_tokenizer(cfg.model, run_dir if info.is_main else None)
    check_chat_template(tokenizer, rubrics, cfg.model)  # message prompts need the tokenizer's chat template
    policy = load_policy(cfg.model, tokenizer, device)
    a = cfg.algorithm
    broadcast_parameters(policy)  # rank 0's initial weights everywhere (before any sharding)
    reference = ReferencePolicy(policy, a.reference, cfg.model.lora.enabled) if a.policy_loss.beta > 0 else None
    # every forward of the loss and (fsdp2) of generation goes through this root module: see dist.py
    model = PolicyForward(policy)
    if strategy == "fsdp2":
        d = cfg.distributed
        shard_fsdp2(model, param_dtype=d.fsdp_param_dtype, reduce_dtype=d.fsdp_reduce_dtype,
                    reshard_after_forward=d.fsdp_reshard_after_forward)
    seed_everything(cfg.seed + info.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optimization
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                  weight_decay=o.weight_decay)
    updates_per_step = a.num_iterations * o.mini_batches
    scheduler = make_scheduler(optimizer, cfg, cfg.max_steps * updates_per_step)
    n_params = sum(p.numel() for p in policy.parameters())
    say(f"policy: {type(policy).__name__}, {n_params / 1e6:.3f}M parameters "
        f"({sum(p.numel() for p in params) / 1e6:.3f}M trainable)")

    # ---- data, rollout engine, scorer
    stream = PromptStream(rubrics, seed=cfg.seed, shuffle=cfg.data.shuffle)
    if cfg.rollout.engine == "vllm":  # vllm_engine.py: a colocated vllm.LLM or vllm serve endpoints
        from .vllm_engine import EngineError, make_vllm_engine

        try:
            engine = make_vllm_engine(policy, tokenizer, cfg, run_dir=run_dir, rank=info.rank, is_main=info.is_main,
                                      device=device)
        except EngineError as exc:
            raise TrainingStopped(str(exc)) from None
        closers.append(engine)
    else:
        engine = make_engine(cfg.rollout.engine, policy, tokenizer, cfg.rollout,
                             via=model if strategy == "fsdp2" else None, synced=strategy == "fsdp2")
    try:
        if cfg.reward.pairwise.enabled:  # rewards from comparisons within each group (pairwise_scorer.py)
            scorer = make_pairwise_scorer(cfg.judge, cfg.scoring, cfg.reward.pairwise, cfg.rollout.num_generations)
        else:
            scorer = make_scorer(cfg.judge, cfg.scoring, cfg.rollout.num_generations, run_dir=run_dir,
                                 rank=info.rank, world_size=info.world_size)
    except ValueError as exc:  # the scoring factories name the key that is wrong
        raise ConfigError(f"judge / scoring: {exc}") from None
    closers.append(scorer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    evaluator = None
    if cfg.eval.every:  # held-out evaluation at the start, every eval.every steps and at the end (evaluate.py)
        from .evaluate import TrainEvaluator, eval_line

        if strategy == "fsdp2":
            raise ConfigError("eval.every: not with distributed.strategy=fsdp2 (the evaluation generates with the "
                              "unsharded policy on each rank); use ddp or eval.every=0")
        evaluator = TrainEvaluator(cfg, policy=policy, tokenizer=tokenizer, scorer=scorer, device=device,
                                   rank=info.rank, world_size=info.world_size)

    # ---- resume
    step, policy_version, consecutive_nan = 0, 0, 0
    counters = {"stale_dropped": 0, "nan_steps": 0}
    rewards_history: list[float] = []
    resume_from = resolve_resume(cfg.checkpoint.resume, ckpt_dir, quiet=True)
    if resume_from is not None:
        state, rank_state = load_checkpoint(resume_from, info.rank, info.world_size)
        if state.get("strategy", "ddp") != strategy:
            raise CheckpointError(f"checkpoint {resume_from} was written with distributed.strategy="
                                  f"{state.get('strategy', 'ddp')}; this run uses {strategy}: resume with the same")
        if strategy == "fsdp2":
            sharded = sharded_state(model, optimizer)
            load_sharded(resume_from, sharded)
            set_sharded_state(model, optimizer, sharded)
        else:
            policy.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if reference is not None and "reference" in state:
            reference.module().load_state_dict(state["reference"])
        elif reference is not None and reference_update.is_dynamic(a):
            say(f"{resume_from} holds no reference weights (written without a dynamic reference): the "
                "reference restarts from the initial policy")
        set_rng_state(rank_state["rng"])
        ts = {**state["train_state"], **rank_state}
        step, policy_version, consecutive_nan = ts["step"], ts["policy_version"], ts["consecutive_nan"]
        counters.update(ts.get("counters", {}))
        stream.seek(ts["data_position"])
        rewards_history = list(ts.get("rewards", []))  # the whole run's, for the closing summary
        say(f"resumed from {resume_from} at step {step}")
        push_weights(engine, policy)  # a separate inference engine must sample from the resumed weights

    G, P = cfg.rollout.num_generations, cfg.data.prompts_per_step // info.world_size
    cal = cfg.reward.calibration

    def judged_text(text: str) -> str:  # RLCR: the judge never sees the confidence statement
        return calibration.judged_text(cal, text) if cal.enabled else text

    mt = cfg.rollout.multiturn
    environment = multiturn.build_environment(mt) if mt.enabled else None

    def submit_samples(batch_samples: list[Sample]) -> None:
        """Every finished sample to the scorer (the k-th of a group is rollout ``group:k``); a multi-turn
        conversation judged per turn is submitted as one unit per assistant turn (``group:k:t``)."""
        units = {id(smp): (multiturn.judged_units(smp.completion, mt.judge) if mt.enabled
                           else [judged_text(smp.completion.text)]) for smp in batch_samples}
        per_group: dict[int, int] = {}
        for smp in batch_samples:
            per_group[smp.group_id] = per_group.get(smp.group_id, 0) + len(units[id(smp)])
        for k, smp in enumerate(batch_samples):
            if mt.enabled and mt.judge == "per_turn":
                for t, text in enumerate(units[id(smp)]):
                    scorer.submit(smp.group_id, f"{smp.group_id}:{k % G}:{t}", smp.rubric, text,
                                  group_size=per_group[smp.group_id])
            else:
                scorer.submit(smp.group_id, f"{smp.group_id}:{k % G}", smp.rubric, units[id(smp)][0])
    group_counter = [0]
    rubric_index = {id(r): i for i, r in enumerate(rubrics)}
    pending: deque[RolloutBatch] = deque()
    next_rollout_step = step
    if resume_from is not None:
        group_counter[0] = ts.get("group_counter", 0)
        next_rollout_step = ts.get("next_rollout_step", step)
        for b in ts.get("pending", []):
            batch = batch_from_state(b, rubrics)
            submit_samples(batch.samples)  # scores are not saved: grade the completions again
            pending.append(batch)

    def rollout(for_step: int) -> RolloutBatch:
        """Generate one step's completions; submit each batch of completions to the scorer at once."""
        t0 = time.perf_counter()
        position = stream.position()
        epoch = stream.epoch
        batch_rubrics = stream.take(P * info.world_size, info.rank, P)
        if stream.epoch != epoch:
            kill_point("epoch", for_step + 1, info.rank)
        gen_prompts, samples, group_ids = [], [], []
        for rubric in batch_rubrics:
            gid = group_counter[0] * info.world_size + info.rank  # unique across ranks
            group_counter[0] += 1
            group_ids.append(gid)
            prompt_ids = encode_prompt(tokenizer, rubric.prompt)
            for i in range(G):
                if cfg.rollout.scaffold.enabled:
                    share = scaffold_share(i, G, for_step, cfg.max_steps, cfg.rollout.scaffold.midpoint,
                                           cfg.rollout.scaffold.steepness)
                    gen_prompts.append(encode_prompt(tokenizer, scaffold_messages(rubric, share)))
                else:
                    gen_prompts.append(prompt_ids)
                samples.append(Sample(gid, rubric, prompt_ids, None, policy_version))  # type: ignore[arg-type]
        k = 0
        n_tok = 0
        if mt.enabled:  # conversations with the environment, then every one of them to the scorer
            episodes = [environment.episode(smp.rubric, i % G) for i, smp in enumerate(samples)]
            convs = multiturn.multiturn_rollout(engine, tokenizer, gen_prompts, [smp.rubric.prompt for smp in samples],
                                                episodes, mt.max_turns)
            for smp, c in zip(samples, convs):
                smp.completion = c
                n_tok += len(c.token_ids)
            if a.empg.enabled:  # EMPG's step entropies, from the policy that sampled the turns
                empg.rollout_turn_entropies(model, samples, pad_id, device, temperature=cfg.rollout.temperature,
                                            token_budget=cfg.optimization.tokens_per_micro_batch)
            submit_samples(samples)
            kill_point("rollout", for_step + 1, info.rank)
            return RolloutBatch(for_step, policy_version, position, samples, group_ids, time.perf_counter() - t0,
                                n_tok)
        for completions in engine.generate(gen_prompts):
            for c in completions:
                s = samples[k]
                s.completion = c
                n_tok += len(c.token_ids)
                scorer.submit(s.group_id, f"{s.group_id}:{k % G}", s.rubric, judged_text(c.text))
                k += 1
            kill_point("rollout", for_step + 1, info.rank)
        return RolloutBatch(for_step, policy_version, position, samples, group_ids, time.perf_counter() - t0, n_tok)

    depth = 2 if cfg.rollout.overlap else 1
    t_run = time.perf_counter()
    log.log_config(config_to_dict(cfg))  # only now: the data, the judge and the checkpoint were all accepted
    if evaluator is not None and step == 0:  # the starting policy, on the held-out prompts
        eval_metrics, eval_res = evaluator.run(0)
        say(eval_line(0, eval_res))
        log.log(0, eval_metrics)

    def checkpoint() -> Path:
        # batches generated ahead (overlap) are saved as they are and re-scored on resume (the judge cache
        # answers), so the continuation is the same as without the interruption
        rank_state = {"rng": rng_state(), "group_counter": group_counter[0], "next_rollout_step": next_rollout_step,
                      "pending": [batch_to_state(b, rubric_index) for b in pending]}
        bundle = None
        if info.is_main:
            bundle = {"scheduler": scheduler.state_dict(), "strategy": strategy,
                      "world_size": info.world_size, "judge_cache": scorer.cache_path,
                      "train_state": {"step": step, "policy_version": policy_version,
                                      "data_position": stream.position(), "consecutive_nan": consecutive_nan,
                                      "counters": dict(counters), "rewards": list(rewards_history)},
                      "config": config_to_dict(cfg)}
            if strategy != "fsdp2":
                bundle["model"], bundle["optimizer"] = policy.state_dict(), optimizer.state_dict()
            if reference is not None and reference_update.is_dynamic(a):  # the moved anchor (a full replica)
                bundle["reference"] = reference.module().state_dict()
        try:
            return save_checkpoint(ckpt_dir, step, bundle, keep_last=cfg.checkpoint.keep_last, rank_state=rank_state,
                                   sharded=sharded_state(model, optimizer) if strategy == "fsdp2" else None,
                                   rank=info.rank, world_size=info.world_size)
        except OSError as exc:
            raise TrainingStopped(f"checkpoint.dir: {os_error_text(exc, ckpt_dir)}") from None

    SIGNALS.deferred = True  # from here a signal finishes the step and checkpoints (see interrupt.py)
    try:
        while step < cfg.max_steps:
            SIGNALS.step_hint = f"step {step + 1}/{cfg.max_steps}"
            # ---- 1. rollout (step k+1 is generated while step k is scored)
            while len(pending) < depth and next_rollout_step < cfg.max_steps:
                try:
                    pending.append(rollout(next_rollout_step))
                except RuntimeError as exc:  # a vllm server gone mid-run: one line naming it, exit 1
                    from .vllm_engine import EngineError

                    if not isinstance(exc, EngineError):
                        raise
                    raise TrainingStopped(str(exc)) from None
                next_rollout_step += 1
            batch = pending.popleft()

            # ---- 2. rewards: block until this step's groups are scored
            t_wait = time.perf_counter()
            by_group: dict[int, list[ScoredCompletion]] = {g: scorer.collect(g) for g in batch.group_ids}
            score_wait = time.perf_counter() - t_wait
            for g, scored in by_group.items():
                members = [s for s in batch.samples if s.group_id == g]
                if mt.enabled:  # one result per conversation (per-turn rewards averaged, environment reward)
                    scored = multiturn.combine_scored([s.completion for s in members], scored, mt.judge,
                                                      mt.env_reward_weight)
                for s, r in zip(members, scored):
                    s.reward, s.verdicts, s.guard_reason = r.reward, r.verdicts, r.guard_reason
                    s.errors = rollout_errors(r) if r.reward is None else []
                    if cal.enabled:  # RLCR: correctness from the rubric, plus the Brier term
                        s.reward, s.extras["calibration"] = calibration.calibrated_reward(
                            cal, s.completion.text, r.reward, r.verdicts)
            staleness = policy_version - batch.policy_version
            samples = batch.samples
            stale = 0
            if staleness > cfg.rollout.max_staleness:
                stale, samples = len(samples), []
                counters["stale_dropped"] += stale

            # ---- 3. advantages (missing rewards excluded), groups without signal dropped
            metrics: dict[str, float] = {}
            rewards = [s.reward for s in batch.samples]
            valid_rewards = [r for r in rewards if r is not None]
            n_valid = global_sum(len(valid_rewards), device)  # the reward of the whole (global) batch
            # a step in which the judge answered nothing (the guard's verdicts are no judgements) ends the run
            asked = [s for s in batch.samples if s.guard_reason is None]
            if global_sum(len(asked), device) > 0 and global_sum(sum(s.reward is not None for s in asked), device) == 0:
                errors = [e for s in asked for e in s.errors]
                if errors and all(e.startswith("parse") for e in errors):  # answers, but never in the format
                    hint = ("judge.structured: the judge never answered in the requested JSON format; set "
                            "judge.structured=true (the reply's schema enforced: vLLM structured outputs, or while "
                            "the hf judge decodes) or a judge.model that follows the format")
                else:
                    hint = "Check the judge (judge.endpoints, its logs, judge.timeout_s)"
                raise TrainingStopped(
                    f"step {step + 1}: every judgement failed ({len(asked)} rollouts on this rank); errors: "
                    f"{summarize_errors(errors)}. {hint}")
            mean_reward = global_sum(sum(valid_rewards), device) / n_valid if n_valid else float("nan")
            if cfg.rollout.refine.enabled and samples:  # RGR: revisions of the best responses join their groups
                revised, refine_metrics = refine.refine_groups(
                    samples, cfg.rollout.refine, engine=engine, tokenizer=tokenizer, scorer=scorer,
                    encode_prompt=encode_prompt, policy_version=policy_version)
                samples = samples + revised
                metrics.update(refine_metrics)
            train_samples: list[Sample] = []
            if samples:
                r_t = torch.tensor([float("nan") if s.reward is None else s.reward for s in samples], dtype=torch.float32)
                g_t = torch.tensor([s.group_id for s in samples], dtype=torch.long)
                metric = torch.tensor([float(len(s.completion.token_ids)) for s in samples])
                adv, valid = ops.group_advantages(r_t, g_t, estimator=a.estimator, scale=a.scale, eps=a.adv_eps,
                                                  positive_weight=a.positive_weight,
                                                  metric=metric if a.estimator == "canon" else None)
                adv = adv.float() * a.advantage_sign
                # OREAL: positive / negative loss factors, folded into the advantages (see oreal.py)
                adv_list = oreal.scale_advantages(adv.tolist(), a.positive_loss_factor, a.negative_loss_factor)
                keep = (oreal.best_worst_keep([s.reward for s in samples], [s.group_id for s in samples])
                        if a.best_worst_only else [True] * len(samples))
                if a.empg.enabled:  # per-token advantages g(H_t) A_i + zeta f(H_t+1) (a collective: every rank)
                    idx = [i for i, ok in enumerate(valid.tolist()) if ok]
                    step_adv = empg.empg_step_advantages([adv_list[i] for i in idx],
                                                         [samples[i].completion.turn_entropy for i in idx],
                                                         a.empg, device=device)
                    for i, sa in zip(idx, step_adv):
                        c = samples[i].completion
                        samples[i].token_advantages = empg.token_advantages(sa, c.turn_spans, len(c.token_ids))
                    hs = [h for i in idx for h in samples[i].completion.turn_entropy]
                    if hs:
                        metrics["empg/step_entropy"] = sum(hs) / len(hs)
                live_groups = set()
                for s, av, ok in zip(samples, adv_list, valid.tolist()):
                    s.advantage = av
                    if ok and (av != 0.0 or not a.drop_zero_variance_groups):
                        live_groups.add(s.group_id)
                train_samples = [s for s, ok, kp in zip(samples, valid.tolist(), keep)
                                 if ok and kp and s.group_id in live_groups and len(s.completion.token_ids) > 0]
                metrics["groups_dropped"] = float(len(batch.group_ids) - len(live_groups))
                metrics["samples_trained"] = float(len(train_samples))

            # ---- 4. update
            t_up = time.perf_counter()
            if hasattr(engine, "before_update"):  # colocated vLLM on CUDA sleeps through the update
                engine.before_update()
            upd = update(cfg, model, reference, optimizer, scheduler, train_samples, pad_id, device, strategy=strategy,
                         step=step + 1, rank=info.rank)
            update_time = time.perf_counter() - t_up
            if upd["updates"] > 0:
                push_weights(engine, policy)  # before anything is generated from the new policy version
            if upd["nonfinite"]:
                consecutive_nan += 1
                counters["nan_steps"] += 1
                print(f"[rubric_fast] step {step + 1}: non-finite loss or gradient, step skipped "
                      f"({consecutive_nan} in a row, limit {cfg.max_nan_steps})", file=sys.stderr)
                if consecutive_nan >= cfg.max_nan_steps:
                    raise TrainingStopped(
                        f"{consecutive_nan} consecutive steps with a non-finite loss or gradient "
                        f"(max_nan_steps={cfg.max_nan_steps}); lower optimization.lr, check the data, or use "
                        "float32 (model.dtype)")
            else:
                consecutive_nan = 0
            if upd["updates"] > 0:
                policy_version += 1
            step += 1
            if reference is not None and reference_update.is_due(a, step):  # T1: the KL anchor moves (all ranks)
                reference_update.update_reference(reference.module(), policy, ema=a.ref_ema)
                counters["ref_updates"] = counters.get("ref_updates", 0) + 1
            rewards_history.append(mean_reward)

            # ---- 5. log, checkpoint
            eval_metrics = {}
            if evaluator is not None and evaluator.due(step):
                eval_metrics, eval_res = evaluator.run(step)
                say(eval_line(step, eval_res))
                metrics.update(eval_metrics)
            if step % cfg.logging.every == 0 or step == cfg.max_steps:
                metrics.update(step_metrics(batch, mean_reward, upd, update_time, score_wait, stale, counters,
                                            policy_version, staleness, scheduler))
                metrics.update(scorer.metrics())
                if hasattr(engine, "push_seconds"):  # vllm: the last weight push
                    metrics["time/weight_push"] = engine.push_seconds
                if cal.enabled:
                    metrics.update(calibration.step_metrics([s.extras["calibration"] for s in batch.samples]))
                metrics.update(multiturn.step_metrics([s.completion for s in batch.samples]))
                if reference is None:
                    metrics.pop("kl", None)  # no reference policy: no KL to report
                if reference_update.is_dynamic(a):
                    metrics["ref_updates"] = float(counters.get("ref_updates", 0))
                metrics["time/elapsed"] = time.perf_counter() - t_run
                log.log(step, metrics)
            elif eval_metrics:
                log.log(step, eval_metrics)
            if cfg.logging.samples_every and step % cfg.logging.samples_every == 0:
                log.log_samples(step, [sample_row(tokenizer, s) for s in batch.samples[:cfg.logging.num_samples]])
            saved = None
            if ((cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
                    or (step == cfg.max_steps and cfg.checkpoint.save_final)):
                saved = checkpoint()
            signum = SIGNALS.signum or 0
            if info.world_size > 1:  # every rank stops after the same step, whichever got the signal
                signum = global_max(signum, device)
            if signum and step < cfg.max_steps:
                raise Interrupted(signum, step=step, checkpoint=str(saved or checkpoint()))
    finally:
        SIGNALS.deferred = False
    if cfg.checkpoint.export_hf and step >= cfg.max_steps:  # every rank: gathering fsdp2 shards is a collective
        from .export import export_policy

        out = export_policy(policy, tokenizer, cfg.checkpoint.export_dir or run_dir / "hf", model_cfg=cfg.model,
                            rollout_cfg=cfg.rollout, is_main=info.is_main)
        say(f"policy exported in Hugging Face format to {out} (rubric-fast export)")
    if os.environ.get("RUBRIC_FAST_DUMP_PARAM_SUM"):  # tests: every rank must hold the same weights
        checksum = sum(float(full_tensor(p.detach()).double().abs().sum()) for p in policy.parameters())
        print(f"[rubric_fast] rank {info.rank} param checksum {checksum:.10e}", file=sys.stderr)
    return TrainResult(step, rewards_history, str(run_dir), counters["stale_dropped"], counters["nan_steps"])


def update(cfg: TrainConfig, model: nn.Module, reference: ReferencePolicy | None, optimizer, scheduler,
           samples: list[Sample], pad_id: int, device, *, strategy: str = "ddp", step: int = 0,
           rank: int = 0) -> dict[str, Any]:
    """``num_iterations`` passes over the samples, ``mini_batches`` optimizer steps each; returns stats.

    ``model`` is the :class:`PolicyForward` root (FSDP2-sharded with ``strategy="fsdp2"``); a collective
    call on every rank, also on one with no samples.
    """
    a, o = cfg.algorithm, cfg.optimization
    out: dict[str, Any] = {"nonfinite": False, "updates": 0, "tokens": 0, "loss_tokens": 0.0, "loss": 0.0,
                           "stats": {}, "entropy": 0.0, "grad_norm": float("nan"), "is_weight": 0.0}
    params = [p for p in model.parameters() if p.requires_grad]
    # sequences never split across micro-batches; each mini-batch is one optimizer step
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

    # old log-probs and the entropy selection come from a no-grad pre-pass when the loss needs them before
    # the first forward (several iterations: pi_old must stay fixed; top-entropy: one selection over all
    # tokens of all micro-batches and ranks)
    old_cache: dict[int, torch.Tensor] = {}
    ent_mask_cache: dict[int, torch.Tensor] = {}
    if a.num_iterations > 1 or a.policy_loss.top_entropy_fraction is not None:
        with torch.no_grad():
            ents, valids, keys = [], [], []
            for mbs in mini_mbs:
                for mb in mbs:
                    h, w, b = token_hidden(model, mb)
                    lp, ent, _ = ops.linear_logprob_entropy(h, w, mb.targets, bias=b,
                                                            temperature=cfg.rollout.temperature)
                    old_cache[id(mb)] = lp.detach()
                    ents.append(ent)
                    valids.append(mb.loss_weight != 0)
                    keys.append(id(mb))
            if a.policy_loss.top_entropy_fraction is not None and (ents or is_distributed()):  # a collective: every rank
                if not ents:
                    ents = [torch.zeros(0, device=device)]
                    valids, keys = [torch.zeros(0, dtype=torch.bool, device=device)], [None]
                pg = torch.distributed.group.WORLD if is_distributed() else None
                sel = ops.entropy_mask(torch.cat(ents), torch.cat(valids), a.policy_loss.top_entropy_fraction, process_group=pg)
                for k, piece in zip(keys, torch.split(sel, [e.numel() for e in ents])):
                    ent_mask_cache[k] = piece
    stat_sums: dict[str, float] = {}
    entropy_sum = 0.0
    is_sum = 0.0
    for _ in range(a.num_iterations):
        for mbs in mini_mbs:
            # global normalizers: every rank and micro-batch divides by the same count (exact accumulation)
            n_tok = global_sum(sum(float(mb.loss_weight.sum()) for mb in mbs), device)
            n_seq = global_sum(sum(int(torch.unique(mb.seq_index[mb.loss_weight != 0]).numel()) for mb in mbs), device)
            if a.policy_loss.aggregation == "token_mean":
                norm = n_tok
            elif a.policy_loss.aggregation == "constant":
                norm = cfg.rollout.max_new_tokens * n_seq  # Dr. GRPO: a constant per (global) sequence
            else:
                norm = n_seq
            if norm <= 0:
                continue
            loss_cfg = policy_loss_config(cfg, normalizer=norm)
            optimizer.zero_grad(set_to_none=True)
            bad = False
            for i_mb, mb in enumerate(mbs):
                h, w, b = token_hidden(model, mb)
                if id(mb) in old_cache:
                    old = old_cache[id(mb)]
                elif a.is_cap is not None:  # the IS weight needs pi_old before the loss: head only, no grad
                    with torch.no_grad():
                        old, _, _ = ops.linear_logprob_entropy(h.detach(), w.detach(), mb.targets,
                                                               bias=None if b is None else b.detach(),
                                                               temperature=cfg.rollout.temperature,
                                                               return_entropy=False)
                else:
                    old = None  # num_iterations == 1: on-policy, the fused op uses its own log-probs
                is_weight = (ops.truncated_importance_weight(old, mb.sampler_logp, a.is_cap)
                             if a.is_cap is not None else None)
                ref = None
                if reference is not None:
                    with torch.no_grad(), reference.context():
                        # lora_base: the policy itself with adapters off, through the (sharded) root
                        ref_model = model if reference.mode == "lora_base" else reference.module()
                        rh, rw, rb = token_hidden(ref_model, mb)
                        ref, _, _ = ops.linear_logprob_entropy(rh, rw, mb.targets, bias=rb,
                                                               temperature=cfg.rollout.temperature,
                                                               return_entropy=False)
                loss, stats, _, ent = ops.fused_linear_policy_loss(
                    h, w, mb.targets, old, mb.advantages, mb.loss_weight, ref_logp=ref, is_weight=is_weight,
                    seq_index=mb.seq_index, entropy_mask=ent_mask_cache.get(id(mb)), config=loss_cfg, bias=b,
                    temperature=cfg.rollout.temperature)
                # no early exit on a non-finite loss: with fsdp2 the backward is a collective; the step is
                # skipped below on every rank together
                bad = bad or not bool(torch.isfinite(loss))
                loss.backward()  # normalizer is global: the per-rank gradients add up to the batch gradient
                if i_mb == 0:
                    kill_point("backward", step, rank)
                tw = float(mb.loss_weight.sum())
                out["loss"] += float(loss.detach())
                out["tokens"] += mb.n_tokens
                out["loss_tokens"] += tw
                for name, v in stats._asdict().items():
                    stat_sums[name] = stat_sums.get(name, 0.0) + float(v.detach()) * tw
                if ent is not None:
                    entropy_sum += float((ent.detach() * (mb.loss_weight != 0)).sum())
                if is_weight is not None:
                    is_sum += float((is_weight * (mb.loss_weight != 0)).sum())
            if global_sum(float(bad), device) > 0:  # every rank skips together
                optimizer.zero_grad(set_to_none=True)
                out["nonfinite"] = True
                return out
            if strategy == "ddp":  # fsdp2 reduce-scattered the gradients during backward
                sync_gradients(params, cfg.distributed.bucket_mb)
            gn = torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip is not None else float("inf"))
            gn = full_tensor(gn)
            if not torch.isfinite(gn):
                optimizer.zero_grad(set_to_none=True)
                out["nonfinite"] = True
                return out
            out["grad_norm"] = float(gn)
            optimizer.step()
            scheduler.step()
            out["updates"] += 1
    lt = max(out["loss_tokens"], 1.0)
    out["stats"] = {k: v / lt for k, v in stat_sums.items()}
    out["entropy"] = entropy_sum / lt
    out["is_weight"] = is_sum / lt if a.is_cap is not None else float("nan")
    out["loss"] /= max(1, out["updates"])
    return out


def step_metrics(batch: RolloutBatch, mean_reward: float, upd: dict[str, Any], update_time: float,
                 score_wait: float, stale: int, counters: dict[str, int], policy_version: int, staleness: int,
                 scheduler) -> dict[str, float]:
    m: dict[str, float] = {"reward": mean_reward}
    rs = [s.reward for s in batch.samples if s.reward is not None]
    if len(rs) > 1:
        mu = sum(rs) / len(rs)
        m["reward_std"] = (sum((r - mu) ** 2 for r in rs) / (len(rs) - 1)) ** 0.5
    m["reward_missing"] = float(sum(s.reward is None for s in batch.samples))
    # responses the guard judged junk in this step, by reason (rubric_fast.judges.guard.REASONS)
    reasons = [s.guard_reason for s in batch.samples if s.guard_reason]
    m["guarded"] = float(len(reasons))
    for reason in sorted(set(reasons)):
        m[f"guarded/{reason}"] = float(reasons.count(reason))
    passed: dict[str, list[float]] = {}
    for s in batch.samples:
        ids = {c.id for c in s.rubric.criteria}
        for v in s.verdicts:
            if v.score is not None and v.criterion_id in ids:  # not the guard's holistic verdicts
                passed.setdefault(v.criterion_id, []).append(1.0 if v.score >= 0.5 else 0.0)
    for cid, xs in sorted(passed.items()):
        m[f"pass_rate/{cid}"] = sum(xs) / len(xs)
    lens = [len(s.completion.token_ids) for s in batch.samples]
    m["completion_len"] = sum(lens) / max(1, len(lens))
    m["truncated_frac"] = sum(not s.completion.finished for s in batch.samples) / max(1, len(batch.samples))
    st = upd["stats"]
    m.update({"loss": upd["loss"], "kl": st.get("kl_mean", 0.0), "entropy": upd["entropy"],
              "clip_frac_low": st.get("clip_frac_low", 0.0), "clip_frac_high": st.get("clip_frac_high", 0.0),
              "ratio_mean": st.get("ratio_mean", 1.0), "is_weight_mean": upd["is_weight"],
              "grad_norm": upd["grad_norm"], "lr": scheduler.get_last_lr()[0],
              "tokens_per_s": upd["tokens"] / update_time if update_time > 0 else 0.0,
              "rollout_tokens_per_s": batch.rollout_tokens / batch.rollout_time if batch.rollout_time > 0 else 0.0,
              "time/rollout": batch.rollout_time, "time/update": update_time, "time/score_wait": score_wait,
              "policy_version": float(policy_version), "staleness": float(staleness),
              "stale_dropped": float(stale), "stale_dropped_total": float(counters["stale_dropped"]),
              "nan_steps": float(counters["nan_steps"])})
    return m


def sample_row(tokenizer, s: Sample) -> dict[str, Any]:
    return {"prompt": s.rubric.prompt, "response": s.completion.text, "reward": s.reward,
            "advantage": s.advantage, "verdicts": [{"criterion_id": v.criterion_id, "score": v.score,
                                                    "reason": v.reason, "error": v.error} for v in s.verdicts],
            **({"extras": s.extras} if s.extras else {})}
