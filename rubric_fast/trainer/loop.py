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

Where the parts live: :class:`Run` (this file) builds the run and holds the steps; rollouts.py the prompt
stream, generation and rewards (steps 1-2); advantages.py step 3; update.py and batches.py step 4; metrics.py
what a step logs; state.py the train state a checkpoint holds; callbacks.py the hooks (and the test hooks).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rubric_fast import ops
from rubric_fast.rubric import Rubric, load_rubrics
from rubric_fast.scoring.scorer import summarize_errors

from . import calibration, multiturn, reference_update, refine
from .advantages import assign_advantages
from .batches import RolloutBatch, Sample
from .callbacks import Callback, Callbacks, from_environment
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_sharded,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import ConfigError, TrainConfig, config_to_dict
from .dist import (
    DistInfo,
    PolicyForward,
    broadcast_parameters,
    destroy_distributed,
    global_max,
    global_sum,
    init_distributed,
    is_distributed,
    set_sharded_state,
    shard_fsdp2,
    sharded_state,
)
from .interrupt import SIGNALS, Interrupted
from .metrics import sample_row, step_metrics
from .models import ReferencePolicy, check_chat_template, load_policy, load_tokenizer
from .pairwise_scorer import make_pairwise_scorer
from .rewards import make_scorer
from .rollout import make_engine
from .rollouts import Rollouts, encode_prompt
from .rundir import os_error_text, prepare_run_dir
from .state import TrainingStopped, TrainState
from .update import make_scheduler, update


# ------------------------------------------------------------------------------------------------ setup helpers
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


@dataclass
class TrainResult:
    steps: int
    rewards: list[float]           # mean reward per trained step (NaN when no reward was valid)
    run_dir: str
    stale_dropped: int = 0
    nan_steps: int = 0


# ------------------------------------------------------------------------------------------------ the run
def train(cfg: TrainConfig, callbacks: list[Callback] | None = None) -> TrainResult:
    """Run the config to ``max_steps`` (resuming when a checkpoint says so); see the module docstring.
    ``callbacks``: objects with ``on_event(event, step, rank, **info)`` (callbacks.py), after the test hooks
    the environment asks for."""
    threads_before = torch.get_num_threads()
    try:
        own_group = not is_distributed()
        info = init_distributed(cfg.distributed.backend, cfg.distributed.timeout_s)
        result = _train_ranks(cfg, info, Callbacks(from_environment() + list(callbacks or [])))
        if own_group:
            destroy_distributed()  # only after a clean end: after a failure the other ranks may be gone
        return result
    finally:
        torch.set_num_threads(threads_before)  # cpu_threads is for this run, not for the caller's process


def _train_ranks(cfg: TrainConfig, info: DistInfo, on_event: Callbacks) -> TrainResult:
    """The checks before anything is written (data, judge coverage, run directory), then the run."""
    if cfg.data.prompts_per_step % info.world_size:
        raise ConfigError(f"data.prompts_per_step: got {cfg.data.prompts_per_step}; it is the global number of "
                          f"prompts per step and must be a multiple of the world size ({info.world_size})")
    device = pick_device(cfg.device, info)
    if device.type == "cpu" and cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)  # tiny models: more threads only add synchronisation
    say = (lambda msg: print(f"[rubric_fast] {msg}", file=sys.stderr)) if info.is_main else (lambda msg: None)
    run_dir = Path(cfg.logging.run_dir)
    ckpt_dir = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
    rubrics = load_data(cfg)
    start_step = claim_run_dir(cfg, info, run_dir, ckpt_dir, device, say)
    try:
        log = make_logger(cfg, info, purge_step=start_step + 1 if start_step else None)
    except OSError as exc:
        raise ConfigError(f"logging.run_dir: {os_error_text(exc, run_dir)}") from None
    closers: list = []  # the engine (vllm) and the scorer, as they are built: closed even after a failed setup
    try:
        return Run(cfg, info, device, run_dir, ckpt_dir, rubrics, log, say, on_event, closers).train()
    finally:
        for c in reversed(closers):
            c.close()
        log.close()


class Run:
    """One training run on this rank: built top to bottom in ``__init__`` (model, optimizer, engine, scorer,
    rollouts, resume), then ``train()`` runs the steps of the module docstring."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, device: torch.device, run_dir: Path, ckpt_dir: Path,
                 rubrics: list[Rubric], log, say, on_event: Callbacks, closers: list):
        self.cfg, self.info, self.device, self.run_dir, self.ckpt_dir = cfg, info, device, run_dir, ckpt_dir
        self.log, self.say, self.on_event, self.closers = log, say, on_event, closers
        # one process: nothing to shard, the ddp path is the plain single-device path
        self.strategy = cfg.distributed.strategy if info.world_size > 1 else "ddp"
        self.state = TrainState()
        self._build_model(rubrics)
        self._build_engine_and_scorer()
        self.evaluator = self._build_evaluator()
        self.rollouts = Rollouts(cfg, rubrics, tokenizer=self.tokenizer, engine=self.engine, scorer=self.scorer,
                                 model=self.model, pad_id=self.pad_id, device=device, rank=info.rank,
                                 world_size=info.world_size, on_event=on_event)
        self._resume()

    # ---- setup
    def _build_model(self, rubrics: list[Rubric]) -> None:
        """Tokenizer, policy (rank 0's weights everywhere), reference, the forward root, optimizer, schedule."""
        cfg, info, a, o = self.cfg, self.info, self.cfg.algorithm, self.cfg.optimization
        seed_everything(cfg.seed)  # identical initial weights on every rank; sampling gets a per-rank seed below
        self.say(f"ops backends: {', '.join(ops.available_backends())}; device: {self.device}; world size "
                 f"{info.world_size}" + (f", strategy {self.strategy}" if info.world_size > 1 else ""))
        self.tokenizer = load_tokenizer(cfg.model, self.run_dir if info.is_main else None)
        check_chat_template(self.tokenizer, rubrics, cfg.model)  # message prompts need the chat template
        self.policy = load_policy(cfg.model, self.tokenizer, self.device)
        broadcast_parameters(self.policy)  # rank 0's initial weights everywhere (before any sharding)
        self.reference = (ReferencePolicy(self.policy, a.reference, cfg.model.lora.enabled)
                          if a.policy_loss.beta > 0 else None)
        # every forward of the loss and (fsdp2) of generation goes through this root module: see dist.py
        self.model = PolicyForward(self.policy)
        if self.strategy == "fsdp2":
            d = cfg.distributed
            shard_fsdp2(self.model, param_dtype=d.fsdp_param_dtype, reduce_dtype=d.fsdp_reduce_dtype,
                        reshard_after_forward=d.fsdp_reshard_after_forward)
        seed_everything(cfg.seed + info.rank)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                           weight_decay=o.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg, cfg.max_steps * a.num_iterations * o.mini_batches)
        n_params = sum(p.numel() for p in self.policy.parameters())
        self.say(f"policy: {type(self.policy).__name__}, {n_params / 1e6:.3f}M parameters "
                 f"({sum(p.numel() for p in params) / 1e6:.3f}M trainable)")
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _build_engine_and_scorer(self) -> None:
        cfg, info = self.cfg, self.info
        if cfg.rollout.engine == "vllm":  # vllm_engine.py: a colocated vllm.LLM or vllm serve endpoints
            from .vllm_engine import EngineError, make_vllm_engine

            try:
                self.engine = make_vllm_engine(self.policy, self.tokenizer, cfg, run_dir=self.run_dir, rank=info.rank,
                                               is_main=info.is_main, device=self.device)
            except EngineError as exc:
                raise TrainingStopped(str(exc)) from None
            self.closers.append(self.engine)
        else:
            fsdp2 = self.strategy == "fsdp2"
            self.engine = make_engine(cfg.rollout.engine, self.policy, self.tokenizer, cfg.rollout,
                                      via=self.model if fsdp2 else None, synced=fsdp2)
        try:
            if cfg.reward.pairwise.enabled:  # rewards from comparisons within each group (pairwise_scorer.py)
                self.scorer = make_pairwise_scorer(cfg.judge, cfg.scoring, cfg.reward.pairwise,
                                                   cfg.rollout.num_generations)
            else:
                self.scorer = make_scorer(cfg.judge, cfg.scoring, cfg.rollout.num_generations, run_dir=self.run_dir,
                                          rank=info.rank, world_size=info.world_size)
        except ValueError as exc:  # the scoring factories name the key that is wrong
            raise ConfigError(f"judge / scoring: {exc}") from None
        self.closers.append(self.scorer)

    def _build_evaluator(self):
        """Held-out evaluation at the start, every eval.every steps and at the end (evaluate.py)."""
        if not self.cfg.eval.every:
            return None
        from .evaluate import TrainEvaluator

        if self.strategy == "fsdp2":
            raise ConfigError("eval.every: not with distributed.strategy=fsdp2 (the evaluation generates with the "
                              "unsharded policy on each rank); use ddp or eval.every=0")
        return TrainEvaluator(self.cfg, policy=self.policy, tokenizer=self.tokenizer, scorer=self.scorer,
                              device=self.device, rank=self.info.rank, world_size=self.info.world_size)

    def _resume(self) -> None:
        """From the newest checkpoint when checkpoint.resume says so: weights, optimizer, schedule, RNG, the
        train state and the rollouts (pending batches graded again)."""
        cfg, info, strategy = self.cfg, self.info, self.strategy
        resume_from = resolve_resume(cfg.checkpoint.resume, self.ckpt_dir, quiet=True)
        if resume_from is None:
            return
        state, rank_state = load_checkpoint(resume_from, info.rank, info.world_size)
        if state.get("strategy", "ddp") != strategy:
            raise CheckpointError(f"checkpoint {resume_from} was written with distributed.strategy="
                                  f"{state.get('strategy', 'ddp')}; this run uses {strategy}: resume with the same")
        if strategy == "fsdp2":
            sharded = sharded_state(self.model, self.optimizer)
            load_sharded(resume_from, sharded)
            set_sharded_state(self.model, self.optimizer, sharded)
        else:
            self.policy.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.reference is not None and "reference" in state:
            self.reference.module().load_state_dict(state["reference"])
        elif self.reference is not None and reference_update.is_dynamic(cfg.algorithm):
            self.say(f"{resume_from} holds no reference weights (written without a dynamic reference): the "
                     "reference restarts from the initial policy")
        set_rng_state(rank_state["rng"])
        self.state.load_state_dict(state["train_state"])
        self.say(f"resumed from {resume_from} at step {self.state.step}")
        push_weights(self.engine, self.policy)  # a separate inference engine must sample the resumed weights
        self.rollouts.load_state_dict(rank_state, data_position=state["train_state"]["data_position"],
                                      step=self.state.step)

    # ---- the steps
    def train(self) -> TrainResult:
        cfg, st = self.cfg, self.state
        self.t_run = time.perf_counter()
        self.log.log_config(config_to_dict(cfg))  # only now: the data, the judge and the checkpoint were accepted
        if self.evaluator is not None and st.step == 0:  # the starting policy, on the held-out prompts
            self.log.log(0, self._evaluate(0))
        SIGNALS.deferred = True  # from here a signal finishes the step and checkpoints (see interrupt.py)
        try:
            while st.step < cfg.max_steps:
                SIGNALS.step_hint = f"step {st.step + 1}/{cfg.max_steps}"
                self.train_step()
        finally:
            SIGNALS.deferred = False
        if cfg.checkpoint.export_hf and st.step >= cfg.max_steps:  # every rank: gathering fsdp2 shards is a collective
            from .export import export_policy

            out = export_policy(self.policy, self.tokenizer, cfg.checkpoint.export_dir or self.run_dir / "hf",
                                model_cfg=cfg.model, rollout_cfg=cfg.rollout, is_main=self.info.is_main)
            self.say(f"policy exported in Hugging Face format to {out} (rubric-fast export)")
        self.on_event("train_end", st.step, self.info.rank, policy=self.policy)
        return TrainResult(st.step, st.rewards, str(self.run_dir), st.counters["stale_dropped"],
                           st.counters["nan_steps"])

    def train_step(self) -> None:
        """One step: 1. rollout, 2. rewards, 3. advantages, 4. update, 5. log and checkpoint."""
        cfg, st = self.cfg, self.state
        batch = self._next_batch()                                   # 1. (step k+1 generated while k is scored)
        score_wait = self.rollouts.collect(batch)                    # 2. rewards
        staleness = st.policy_version - batch.policy_version
        samples, stale = batch.samples, 0
        if staleness > cfg.rollout.max_staleness:
            stale, samples = len(samples), []
            st.count("stale_dropped", stale)
        self._stop_if_judge_silent(batch)
        mean_reward = self._mean_reward(batch)
        metrics: dict[str, float] = {}
        if cfg.rollout.refine.enabled and samples:  # RGR: revisions of the best responses join their groups
            revised, refine_metrics = refine.refine_groups(
                samples, cfg.rollout.refine, engine=self.engine, tokenizer=self.tokenizer, scorer=self.scorer,
                encode_prompt=encode_prompt, policy_version=st.policy_version)
            samples = samples + revised
            metrics.update(refine_metrics)
        train_samples = assign_advantages(samples, cfg.algorithm, n_groups=len(batch.group_ids),  # 3.
                                          device=self.device, metrics=metrics)
        t_up = time.perf_counter()                                   # 4. update
        upd = self._update(train_samples)
        update_time = time.perf_counter() - t_up
        st.rewards.append(mean_reward)
        metrics.update(self._log_step(batch, mean_reward, upd, update_time, score_wait, stale, staleness, metrics))
        saved = None                                                 # 5. checkpoint; a signal stops here
        if ((cfg.checkpoint.every and st.step % cfg.checkpoint.every == 0)
                or (st.step == cfg.max_steps and cfg.checkpoint.save_final)):
            saved = self.checkpoint()
        signum = SIGNALS.signum or 0
        if self.info.world_size > 1:  # every rank stops after the same step, whichever got the signal
            signum = global_max(signum, self.device)
        if signum and st.step < cfg.max_steps:
            raise Interrupted(signum, step=st.step, checkpoint=str(saved or self.checkpoint()))

    def _next_batch(self) -> RolloutBatch:
        try:
            self.rollouts.fill(self.state.policy_version)
        except RuntimeError as exc:  # a vllm server gone mid-run: one line naming it, exit 1
            from .vllm_engine import EngineError

            if not isinstance(exc, EngineError):
                raise
            raise TrainingStopped(str(exc)) from None
        return self.rollouts.next_batch()

    def _stop_if_judge_silent(self, batch: RolloutBatch) -> None:
        """A step in which the judge answered nothing (the guard's verdicts are no judgements) ends the run."""
        device = self.device
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
                f"step {self.state.step + 1}: every judgement failed ({len(asked)} rollouts on this rank); errors: "
                f"{summarize_errors(errors)}. {hint}")

    def _mean_reward(self, batch: RolloutBatch) -> float:
        """The mean reward of the whole (global) batch, missing rewards excluded."""
        valid = [s.reward for s in batch.samples if s.reward is not None]
        n_valid = global_sum(len(valid), self.device)
        return global_sum(sum(valid), self.device) / n_valid if n_valid else float("nan")

    def _update(self, train_samples: list[Sample]) -> dict[str, Any]:
        """The update, the weight push, the non-finite bookkeeping, the step count and the KL anchor."""
        cfg, st, a = self.cfg, self.state, self.cfg.algorithm
        if hasattr(self.engine, "before_update"):  # colocated vLLM on CUDA sleeps through the update
            self.engine.before_update()
        upd = update(cfg, self.model, self.reference, self.optimizer, self.scheduler, train_samples, self.pad_id,
                     self.device, strategy=self.strategy, step=st.step + 1, rank=self.info.rank,
                     on_event=self.on_event)
        if upd["updates"] > 0:
            push_weights(self.engine, self.policy)  # before anything is generated from the new policy version
        if upd["nonfinite"]:
            st.consecutive_nan += 1
            st.count("nan_steps")
            print(f"[rubric_fast] step {st.step + 1}: non-finite loss or gradient, step skipped "
                  f"({st.consecutive_nan} in a row, limit {cfg.max_nan_steps})", file=sys.stderr)
            if st.consecutive_nan >= cfg.max_nan_steps:
                raise TrainingStopped(
                    f"{st.consecutive_nan} consecutive steps with a non-finite loss or gradient "
                    f"(max_nan_steps={cfg.max_nan_steps}); lower optimization.lr, check the data, or use "
                    "float32 (model.dtype)")
        else:
            st.consecutive_nan = 0
        if upd["updates"] > 0:
            st.policy_version += 1
        st.step += 1
        if self.reference is not None and reference_update.is_due(a, st.step):  # T1: the KL anchor moves
            reference_update.update_reference(self.reference.module(), self.policy, ema=a.ref_ema)
            st.count("ref_updates")
        return upd

    def _evaluate(self, step: int) -> dict[str, float]:
        from .evaluate import eval_line

        eval_metrics, eval_res = self.evaluator.run(step)
        self.say(eval_line(step, eval_res))
        return eval_metrics

    def _log_step(self, batch: RolloutBatch, mean_reward: float, upd: dict[str, Any], update_time: float,
                  score_wait: float, stale: int, staleness: int, metrics: dict[str, float]) -> dict[str, float]:
        """The step's metrics (every logging.every steps and at the end), the held-out evaluation when due, and
        the sample rows."""
        cfg, st, a = self.cfg, self.state, self.cfg.algorithm
        step = st.step
        eval_metrics = self._evaluate(step) if self.evaluator is not None and self.evaluator.due(step) else {}
        metrics.update(eval_metrics)
        if step % cfg.logging.every == 0 or step == cfg.max_steps:
            metrics.update(step_metrics(batch, mean_reward, upd, update_time, score_wait, stale, st.counters,
                                        st.policy_version, staleness, self.scheduler))
            metrics.update(self.scorer.metrics())
            if hasattr(self.engine, "push_seconds"):  # vllm: the last weight push
                metrics["time/weight_push"] = self.engine.push_seconds
            if cfg.reward.calibration.enabled:
                metrics.update(calibration.step_metrics([s.extras["calibration"] for s in batch.samples]))
            metrics.update(multiturn.step_metrics([s.completion for s in batch.samples]))
            if self.reference is None:
                metrics.pop("kl", None)  # no reference policy: no KL to report
            if reference_update.is_dynamic(a):
                metrics["ref_updates"] = float(st.counters.get("ref_updates", 0))
            metrics["time/elapsed"] = time.perf_counter() - self.t_run
            self.log.log(step, metrics)
        elif eval_metrics:
            self.log.log(step, eval_metrics)
        if cfg.logging.samples_every and step % cfg.logging.samples_every == 0:
            rows = [sample_row(self.tokenizer, s) for s in batch.samples[:cfg.logging.num_samples]]
            self.log.log_samples(step, rows)
        return metrics

    def checkpoint(self) -> Path:
        """Save this rank's part (a collective). Batches generated ahead (overlap) are saved as they are and
        graded again on resume (the judge cache answers), so the continuation is the same as without the
        interruption."""
        cfg, info, st = self.cfg, self.info, self.state
        rank_state = {"rng": rng_state(), **self.rollouts.state_dict()}
        bundle = None
        if info.is_main:
            bundle = {"scheduler": self.scheduler.state_dict(), "strategy": self.strategy,
                      "world_size": info.world_size, "judge_cache": self.scorer.cache_path,
                      "train_state": {**st.state_dict(), "data_position": self.rollouts.position()},
                      "config": config_to_dict(cfg)}
            if self.strategy != "fsdp2":
                bundle["model"], bundle["optimizer"] = self.policy.state_dict(), self.optimizer.state_dict()
            if self.reference is not None and reference_update.is_dynamic(cfg.algorithm):  # the moved anchor
                bundle["reference"] = self.reference.module().state_dict()
        try:
            return save_checkpoint(self.ckpt_dir, st.step, bundle, keep_last=cfg.checkpoint.keep_last,
                                   rank_state=rank_state,
                                   sharded=sharded_state(self.model, self.optimizer) if self.strategy == "fsdp2"
                                   else None, rank=info.rank, world_size=info.world_size, on_event=self.on_event)
        except OSError as exc:
            raise TrainingStopped(f"checkpoint.dir: {os_error_text(exc, self.ckpt_dir)}") from None
