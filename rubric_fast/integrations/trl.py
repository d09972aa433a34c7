"""TRL adapters: rubric reward functions and a ``GRPOTrainer`` whose loss runs on rubric_fast's fused op.

Reward functions (TRL's contract: ``f(prompts, completions, **columns) -> list[float | None]``)::

    reward = RubricReward({"judge": {"type": "rule"}})            # sync; or AsyncRubricReward(...)
    trainer = GRPOTrainer(model, reward_funcs=reward, train_dataset=ds, ...)   # ds has a "rubric" column

Each row's rubric comes from a dataset column (``rubric`` by default; see
:func:`rubric_fast.integrations.rubric_from_value` for what a cell may hold: a rubric_fast record as a dict
or JSON string, a list of criteria, HealthBench/verl ``{criterion, points}`` items). Completions are graded
by the configured judge through :class:`~rubric_fast.scoring.StreamingScorer` (cache, guard, pool, deadlines)
and aggregated by the rubric. A failed judgement is ``None``: TRL turns it into NaN and, when every reward
function returned None for a completion, leaves that completion out of its group's baseline and gives it
advantage 0 (TRL 1.16; older releases summed NaN rewards to 0). Once the scorer's error-rate threshold is crossed the call raises
:class:`~rubric_fast.scoring.ScoringError` instead of feeding the trainer a batch of None.

The loss (``RubricFastGRPOTrainer``): the policy forward stops at the last hidden states
(:func:`rubric_fast.integrations.hf.hidden_states_and_head`) and ``rubric_fast.ops.fused_linear_policy_loss``
takes hidden states, LM-head weight, targets, old / reference log-probs, advantages and the completion mask,
and returns the loss with its gradient, never building the [B, T, V] logits. ``GRPOConfig`` maps onto
:class:`~rubric_fast.ops.PolicyLossConfig` as follows (anything else is refused with a message that names
the TRL argument, see :func:`policy_loss_mapping`):

=====================  =======================================================================================
TRL                    rubric_fast
=====================  =======================================================================================
loss_type grpo, sapo   aggregation ``seq_mean_token_mean``, normalizer = B x grad-accum steps
loss_type bnpo         ``token_mean``, normalizer = local mask sum x grad-accum steps
loss_type dr_grpo      ``constant``, normalizer = B x max_completion_length x grad-accum steps
loss_type dapo, cispo  ``token_mean``, normalizer = num_items_in_batch / processes x GA / steps_per_generation
loss_type luspo        ``seq_mean_token_sum``, normalizer = B x grad-accum steps
loss_type grpo-family  loss ``ppo_clip``; ``epsilon`` -> ``eps_low``, ``epsilon_high`` -> ``eps_high``,
                       ``delta`` -> ``delta``
importance_sampling_   loss ``gspo`` (GSPO-token: same value and gradient as TRL's sequence ratio for every
level=sequence         aggregation that weighs a sequence's tokens equally, i.e. all of the above)
loss_type cispo        loss ``cispo``; TRL caps the ratio at ``epsilon_high`` itself, so eps_high = epsilon_high - 1
loss_type sapo         loss ``sapo``; ``sapo_temperature_pos/neg`` -> ``sapo_tau_pos/neg``
beta                   ``beta`` with ``kl="k3"`` against ``ref_per_token_logps``
temperature            ``temperature`` of the fused op (logits / T, as TRL's fused LM head)
top_entropy_quantile   ``top_entropy_fraction = top_entropy_quantile`` (the kept fraction; see below)
entropy_coef           ``entropy_coef`` (only where both normalise alike: bnpo, no entropy mask)
vLLM IS correction,    ``is_weight`` (the per-token weight on the policy term only, as in TRL)
off_policy_mask_
threshold
=====================  =======================================================================================

Entropy selection. TRL's ``top_entropy_quantile`` = rho keeps the tokens whose entropy is >= the
``(1 - rho)``-quantile (``torch.quantile``, linear interpolation) of the valid entropies of the batch, i.e.
roughly the top-rho fraction, ties at the threshold all kept. ``entropy_selection="top_fraction"`` (default)
uses rubric_fast's selection inside the fused op: exactly ``ceil(rho * n)`` tokens, ties broken by position;
counts can differ from TRL's by one token and on ties, and the mask also multiplies the KL term (TRL's
does not), so ``beta != 0`` with rho < 1 needs ``entropy_selection="quantile"``. ``"quantile"`` reproduces
TRL's mask exactly (TRL's own ``get_high_entropy_mask``, from a no-grad log-prob/entropy pass) and applies it
to the policy term only, like TRL. rho = 0 (TRL: only the maximum) becomes a fraction that selects 1 token.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

import torch

from . import BackgroundScorer, RubricCache, build_scorer_from, response_text, score_all

__all__ = ["AsyncRubricReward", "RubricFastGRPOTrainer", "RubricReward", "TRLLossMapping",  # noqa: F822
           "UnsupportedTRLConfig", "policy_loss_mapping"]


# ================================================================================================== rewards
class _RubricRewardBase:
    def __init__(self, scorer_config: Any = None, *, judge: Any = None, rubric_column: str = "rubric",
                 name: str = "rubric_reward", reference_column: str | None = "reference_answer",
                 log_metrics: bool = True):
        self.scorer_config = scorer_config
        self.judge = judge
        self.rubric_column = rubric_column
        self.reference_column = reference_column
        self.log_metrics = log_metrics
        # TRL names the reward's metrics ("rewards/<name>/mean") after __name__
        self.__name__ = name
        self._rubrics = RubricCache()
        self._calls = 0

    def _items(self, prompts, completions, kwargs) -> list[tuple[str, Any, str]]:
        if self.rubric_column not in kwargs:
            cols = sorted(k for k in kwargs if k not in ("trainer_state", "log_extra", "log_metric", "environments"))
            raise KeyError(f"{self.__name__}: the dataset has no column {self.rubric_column!r} (columns passed by "
                           f"TRL: {cols}); put each row's rubric there or pass rubric_column=")
        rubrics = kwargs[self.rubric_column]
        refs = kwargs.get(self.reference_column) if self.reference_column else None
        if len(rubrics) != len(completions):
            raise ValueError(f"{self.__name__}: {len(rubrics)} rubrics for {len(completions)} completions")
        self._calls += 1
        items = []
        for i, (p, c, r) in enumerate(zip(prompts, completions, rubrics)):
            ref = refs[i] if refs is not None else None
            rubric = self._rubrics.get(r, prompt=p, reference_answer=ref if isinstance(ref, str) else None,
                                       where=f"{self.__name__}: column {self.rubric_column!r}, row {i} of the batch")
            items.append((f"trl-{self._calls}-{i}", rubric, response_text(c)))
        return items

    def _finish(self, scored, scorer, kwargs) -> list[float | None]:
        rewards = [None if s.reward is None else float(s.reward) for s in scored]
        failed = [s.error or "failed" for s in scored if s.reward is None]
        if self.log_metrics:
            log_metric = kwargs.get("log_metric")
            if callable(log_metric):
                log_metric(f"{self.__name__}/failed_frac", len(failed) / max(1, len(scored)))
            log_extra = kwargs.get("log_extra")
            if callable(log_extra) and failed:
                log_extra(f"{self.__name__}_error", [s.error if s.reward is None else None for s in scored])
        if scorer.fatal is not None:
            raise scorer.fatal
        return rewards


class RubricReward(_RubricRewardBase):
    """Synchronous TRL reward function: ``reward(prompts, completions, rubric=[...], **_) -> list[float | None]``.

    ``scorer_config``: the scorer mapping of :mod:`rubric_fast.scoring` (``{"judge": {"type": "http", ...},
    "deadline_s": 120, "cache_path": ..., "max_error_rate": ...}``); default ``{"judge": {"type": "rule"}}``.
    ``judge``: a ready judge object instead of ``scorer_config["judge"]``. The scorer runs on its own
    event-loop thread (:class:`~rubric_fast.integrations.BackgroundScorer`); all completions of a call are
    graded concurrently. Call :meth:`close` (or use ``with``) to stop it.
    """

    def __init__(self, scorer_config: Any = None, **kw):
        super().__init__(scorer_config, **kw)
        self._bg: BackgroundScorer | None = None

    @property
    def scorer(self):
        if self._bg is None:
            self._bg = BackgroundScorer(self.scorer_config, judge=self.judge)
        return self._bg.scorer

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        items = self._items(prompts, completions, kwargs)
        scorer = self.scorer
        return self._finish(self._bg.score_many(items), scorer, kwargs)

    def metrics(self) -> dict:
        return {} if self._bg is None else self._bg.metrics()

    def close(self) -> None:
        if self._bg is not None:
            self._bg.close()
            self._bg = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncRubricReward(_RubricRewardBase):
    """Async TRL reward function (``async def __call__``): TRL awaits it on its own event loop, concurrently
    with its other async reward functions. The scorer is built on first use inside that loop and must stay
    on it. Same arguments as :class:`RubricReward`; ``await reward.aclose()`` at the end."""

    def __init__(self, scorer_config: Any = None, **kw):
        super().__init__(scorer_config, **kw)
        self.scorer = None

    async def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        items = self._items(prompts, completions, kwargs)
        if self.scorer is None:
            self.scorer = build_scorer_from(self.scorer_config, self.judge)
        return self._finish(await score_all(self.scorer, items), self.scorer, kwargs)

    def metrics(self) -> dict:
        return {} if self.scorer is None else self.scorer.metrics()

    async def aclose(self) -> None:
        if self.scorer is not None:
            await self.scorer.aclose()
            self.scorer = None


# ================================================================================================== loss mapping
class UnsupportedTRLConfig(ValueError):
    """A GRPOConfig setting that rubric_fast's fused loss does not compute the way TRL does."""


_GRPO_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
MAPPED_LOSS_TYPES = _GRPO_FAMILY + ("cispo", "sapo")
ENTROPY_SELECTIONS = ("top_fraction", "quantile")
# rho = 0 in TRL keeps only the maximum-entropy token(s); ceil(tiny * n) = 1 for any batch
_MIN_FRACTION = 1e-12


def _refuse(arg: str, value: Any, why: str, fix: str) -> UnsupportedTRLConfig:
    return UnsupportedTRLConfig(f"RubricFastGRPOTrainer: GRPOConfig.{arg}={value!r} is not supported: {why}. {fix}")


@dataclass(frozen=True)
class TRLLossMapping:
    """How one ``GRPOConfig`` maps onto the fused op. ``config`` has no normalizer yet: the normalizer
    depends on the batch, see :meth:`for_batch`."""

    config: Any                 # PolicyLossConfig
    normalization: str          # "seqs", "local_tokens", "max_len", "global_tokens", "seqs_sum"
    temperature: float
    sequence_level: bool
    entropy_selection: str
    top_entropy_quantile: float
    max_completion_length: int | None

    def for_batch(self, *, num_seqs: int, num_tokens: float, grad_accum_steps: int = 1,
                  num_items_in_batch: float | None = None, num_processes: int = 1, steps_per_generation: int = 1,
                  training: bool = True):
        """The PolicyLossConfig of one micro-batch: TRL's normalisation (gradient accumulation included)."""
        ga = grad_accum_steps if training else 1
        norm = self.normalization
        if norm == "seqs":
            return self.config.replace(aggregation="seq_mean_token_mean", normalizer=float(num_seqs * ga))
        if norm == "seqs_sum":
            return self.config.replace(aggregation="seq_mean_token_sum", normalizer=float(num_seqs * ga))
        if norm == "local_tokens":
            return self.config.replace(aggregation="token_mean", normalizer=float(max(num_tokens, 1.0) * ga))
        if norm == "max_len":
            return self.config.replace(aggregation="constant",
                                       normalizer=float(num_seqs * self.max_completion_length * ga))
        # global_tokens (dapo, cispo): TRL's num_items_in_batch spans the generation batch of all processes
        if num_items_in_batch is None:
            raise ValueError("num_items_in_batch: required for loss_type dapo / cispo")
        n = max(float(num_items_in_batch), 1.0) / num_processes
        if training:
            n = n * grad_accum_steps / steps_per_generation
        return self.config.replace(aggregation="token_mean", normalizer=float(n))


def policy_loss_mapping(args: Any, *, entropy_selection: str = "top_fraction") -> TRLLossMapping:
    """Map a TRL ``GRPOConfig`` onto the fused op, or raise :class:`UnsupportedTRLConfig` naming the argument.

    Refused: ``loss_type='vespo'``; ``cispo`` / ``sapo`` with ``importance_sampling_level='sequence'``;
    ``beta != 0`` with ``use_bias_correction_kl=True`` (TRL's default: the KL term times the differentiable
    ratio); ``entropy_coef`` / ``use_adaptive_entropy`` except for ``bnpo`` without an entropy mask;
    ``top_entropy_quantile < 1`` with sequence-level ratios, or with ``beta != 0`` under
    ``entropy_selection='top_fraction'``; ``epsilon >= 1``; ``delta <= 1 + epsilon_high``.
    """
    from rubric_fast.ops import PolicyLossConfig

    if entropy_selection not in ENTROPY_SELECTIONS:
        raise ValueError(f"entropy_selection: must be one of {', '.join(ENTROPY_SELECTIONS)}; got {entropy_selection!r}")
    loss_type = args.loss_type
    if loss_type not in MAPPED_LOSS_TYPES:
        raise _refuse("loss_type", loss_type, "rubric_fast's fused loss has no VESPO gamma weighting"
                      if loss_type == "vespo" else f"unknown to the mapping (mapped: {', '.join(MAPPED_LOSS_TYPES)})",
                      "Use one of " + ", ".join(MAPPED_LOSS_TYPES) + ", or TRL's own GRPOTrainer.")
    level = args.importance_sampling_level
    if level not in ("token", "sequence"):
        raise _refuse("importance_sampling_level", level, "accepted values are 'token' and 'sequence'", "")
    seq = level == "sequence"
    if seq and loss_type in ("cispo", "sapo"):
        raise _refuse("importance_sampling_level", level,
                      f"loss_type={loss_type!r} with a sequence-level ratio has no rubric_fast counterpart "
                      "(only the clipped ratio has a sequence form, GSPO)",
                      "Use importance_sampling_level='token', or loss_type grpo/bnpo/dr_grpo/dapo/luspo for GSPO.")
    beta = float(args.beta)
    if beta != 0.0 and getattr(args, "use_bias_correction_kl", False):
        raise _refuse("use_bias_correction_kl", True,
                      "TRL then multiplies the KL term by the (differentiable) importance ratio, which the fused "
                      "loss does not do", f"Set use_bias_correction_kl=False (beta={beta:g} is then mapped to "
                      "PolicyLossConfig.beta with kl='k3'), or beta=0.")
    rho = float(args.top_entropy_quantile)
    if not 0.0 <= rho <= 1.0:
        raise _refuse("top_entropy_quantile", rho, "must lie in [0, 1]", "")
    if rho < 1.0 and seq:
        raise _refuse("top_entropy_quantile", rho,
                      "with importance_sampling_level='sequence' TRL's masked tokens still pass gradient to the "
                      "whole sequence through its sequence ratio; the fused GSPO-token loss cannot mask that way",
                      "Use top_entropy_quantile=1.0 or importance_sampling_level='token'.")
    if rho < 1.0 and beta != 0.0 and entropy_selection == "top_fraction":
        raise _refuse("top_entropy_quantile", rho,
                      "rubric_fast's in-op entropy selection also masks the KL term, TRL's masks only the policy "
                      "term", "Pass entropy_selection='quantile' (TRL's exact mask, policy term only) or beta=0.")
    entropy_coef = float(getattr(args, "entropy_coef", 0.0) or 0.0)
    if getattr(args, "use_adaptive_entropy", False):
        raise _refuse("use_adaptive_entropy", True, "the adaptive entropy controller is not mapped",
                      "Use a fixed entropy_coef with loss_type='bnpo', or TRL's own GRPOTrainer.")
    if entropy_coef != 0.0 and (loss_type != "bnpo" or rho < 1.0):
        raise _refuse("entropy_coef", entropy_coef,
                      "TRL's entropy bonus is a plain token mean over the (entropy-masked) tokens whatever the "
                      f"loss normalisation; the fused loss normalises it like the policy term, which agrees only "
                      f"for loss_type='bnpo' without an entropy mask (got loss_type={loss_type!r}, "
                      f"top_entropy_quantile={rho:g})", "Use loss_type='bnpo' and top_entropy_quantile=1.0, or "
                      "entropy_coef=0.")
    eps_low = float(args.epsilon)
    eps_high = float(args.epsilon_high if args.epsilon_high is not None else args.epsilon)
    temperature = float(args.temperature)
    if not temperature > 0:
        raise _refuse("temperature", temperature, "must be > 0", "")
    kw: dict[str, Any] = dict(beta=beta, kl="k3", entropy_coef=entropy_coef)
    if loss_type == "cispo":
        if eps_high < 1.0:
            raise _refuse("epsilon_high", eps_high,
                          "TRL's cispo caps the ratio at epsilon_high itself (ScaleRL's eps_max, e.g. 5.0); a cap "
                          "below 1 has no rubric_fast counterpart (cap = 1 + eps_high, eps_high >= 0)",
                          "Set epsilon_high >= 1 (the recommended value is 5.0).")
        kw.update(loss="cispo", eps_low=eps_low if 0.0 <= eps_low < 1.0 else 0.0, eps_high=eps_high - 1.0)
    else:
        if not 0.0 <= eps_low < 1.0:
            raise _refuse("epsilon", eps_low, "the lower clip 1 - epsilon must be in (0, 1]", "Use 0 <= epsilon < 1.")
        if eps_high < 0:
            raise _refuse("epsilon_high", eps_high, "must be >= 0", "")
        kw.update(eps_low=eps_low, eps_high=eps_high)
        if loss_type == "sapo":
            kw.update(loss="sapo", sapo_tau_pos=float(args.sapo_temperature_pos),
                      sapo_tau_neg=float(args.sapo_temperature_neg))
        else:
            kw.update(loss="gspo" if seq else "ppo_clip")
            if args.delta is not None:
                if not float(args.delta) > 1.0 + eps_high:
                    raise _refuse("delta", args.delta, f"the two-sided clip must exceed 1 + epsilon_high = "
                                  f"{1 + eps_high:g} (TRL recommends the same)", "Raise delta or unset it.")
                kw.update(delta=float(args.delta))
    if rho < 1.0 and entropy_selection == "top_fraction":
        kw.update(top_entropy_fraction=max(rho, _MIN_FRACTION))
    normalization = {"grpo": "seqs", "sapo": "seqs", "bnpo": "local_tokens", "dr_grpo": "max_len",
                     "dapo": "global_tokens", "cispo": "global_tokens", "luspo": "seqs_sum"}[loss_type]
    try:
        cfg = PolicyLossConfig(**kw)
    except ValueError as exc:  # name the TRL arguments behind the PolicyLossConfig field
        raise UnsupportedTRLConfig(f"RubricFastGRPOTrainer: the GRPOConfig maps to an invalid PolicyLossConfig "
                                   f"({exc}); check epsilon / epsilon_high / delta / beta / sapo_temperature_*") from exc
    return TRLLossMapping(cfg, normalization, temperature, seq, entropy_selection, rho,
                          args.max_completion_length)


# ================================================================================================== trainer
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
                    "mm_token_type_ids", "image_position_ids", "spatial_shapes", "num_tiles")


def _install_loss_forward(model) -> None:
    """Let ``model(input_ids, attention_mask, rubric_fast_loss=fn)`` run ``fn(base_model, ...)`` inside the
    model's forward. The loss then goes through every wrapper's forward (DDP, FSDP, accelerate, peft) like TRL's
    own fused LM head does, so gradient hooks and parameter gathering behave as in TRL."""
    if getattr(model, "_rubric_fast_loss_forward", False):
        return
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, rubric_fast_loss=None, **kwargs):
        if rubric_fast_loss is None:
            return previous(*args, **kwargs)
        return rubric_fast_loss(self, *args, **kwargs)

    model.forward = types.MethodType(forward, model)
    model._rubric_fast_loss_forward = True


def _default_process_group(accelerator):
    if accelerator.num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.group.WORLD
    return None


@torch.no_grad()
def _prepass(trainer, h, weight, bias, targets, mp, inputs, old_flat, is_weight, adv_tok, adv_dim: int, mask,
             quantile: bool, extra: dict):
    """Current log-probs / entropies (no grad): the old policy when TRL skipped it (on-policy), the off-policy
    mask, TRL's quantile entropy mask. Returns (old log-probs, importance weight) flat."""
    from rubric_fast.ops import linear_logprob_entropy

    bsz, clen = mask.shape
    lp0, ent0, _ = linear_logprob_entropy(h.detach(), weight.detach(), targets,
                                          bias=None if bias is None else bias.detach(), temperature=mp.temperature)
    lp0 = lp0.view(bsz, clen)
    if old_flat is None:
        old_flat = lp0.reshape(-1)
    extra_w = torch.ones(bsz, clen, device=h.device)
    if trainer.off_policy_mask_threshold is not None:
        olp = old_flat.view(bsz, clen)
        sampling = inputs.get("sampling_per_token_logps", olp)
        extra_w = extra_w * trainer.get_off_policy_mask(
            advantages=adv_tok[:, :1] if adv_dim == 1 else adv_tok, per_token_logps=lp0,
            sampling_per_token_logps=sampling, mask=mask, off_policy_threshold=trainer.off_policy_mask_threshold)
    if quantile:
        emask = trainer.get_high_entropy_mask(ent0.view(bsz, clen), mask, 1 - mp.top_entropy_quantile)
        extra["entropy_mask"] = emask
        extra_w = extra_w * emask.float()
    if trainer.off_policy_mask_threshold is not None or quantile:
        ew = extra_w.reshape(-1)
        is_weight = ew if is_weight is None else is_weight * ew
    return old_flat, is_weight


@torch.no_grad()
def _log_metrics(trainer, mode, mp, cfg, logp, entropies, old, adv, mask, ref, entropy_mask, loss):
    """TRL's own metrics, from the op's detached per-token log-probs and entropies ."""
    from trl.trainer.utils import nanmax, nanmin

    maskf = mask.float()
    log_ratio = logp - old
    if mp.sequence_level:
        coef_1 = torch.exp((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        coef_1 = torch.exp(log_ratio)
    advantages = adv[:, :1] if mp.sequence_level else adv

    def masked_seq_mean(x):
        if x.shape[1] == 1:
            return x.squeeze(1)
        return (x * maskf).sum(-1) / maskf.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            local_sum, local_count = (x * maskf).sum(), maskf.sum()
        totals = trainer.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    m = trainer._metrics[mode]
    if ref is not None:
        d = ref - logp
        m["kl"].append(global_masked_mean(torch.exp(d) - d - 1))
    m["entropy"].append(global_masked_mean(entropies))
    if cfg.entropy_coef != 0.0:
        m["policy_loss"].append(trainer.accelerator.gather(loss.detach()).nanmean().item())
    if trainer.loss_type in _GRPO_FAMILY:
        lo = (coef_1 < 1 - trainer.epsilon_low) & (advantages < 0)
        hi = (coef_1 > 1 + trainer.epsilon_high) & (advantages > 0)
        m["clip_ratio/low_mean"].append(global_masked_mean(lo.float()))
        m["clip_ratio/high_mean"].append(global_masked_mean(hi.float()))
        m["clip_ratio/region_mean"].append(global_masked_mean((lo | hi).float()))
        m["clip_ratio/low_min"].append(nanmin(trainer.accelerator.gather(masked_seq_mean(lo.float()))).item())
        m["clip_ratio/high_max"].append(nanmax(trainer.accelerator.gather(masked_seq_mean(hi.float()))).item())
    elif trainer.loss_type == "cispo":
        clipped = (coef_1 > trainer.epsilon_high) & (advantages > 0)
        m["cispo_clip_ratio"].append(global_masked_mean(clipped.float()))


def _make_trainer_class():
    from trl import GRPOTrainer

    class RubricFastGRPOTrainer(GRPOTrainer):
        """TRL's ``GRPOTrainer`` with the policy loss computed by ``rubric_fast.ops.fused_linear_policy_loss``.

        Generation, rewards, advantages, reference / old log-probs, logging and checkpoints stay TRL's; only
        ``_compute_loss`` changes: the model runs up to its last hidden states and the fused op goes from
        hidden states and LM-head weight to the loss and its gradient without the [B, T, V] logits.
        ``entropy_selection``: ``"top_fraction"`` (default, exact ceil(rho * n) tokens inside the op) or
        ``"quantile"`` (TRL's own mask); see the module docstring. Settings the op cannot reproduce are refused
        at construction with :class:`UnsupportedTRLConfig`.
        """

        def __init__(self, *args, entropy_selection: str = "top_fraction", **kwargs):
            super().__init__(*args, **kwargs)
            from rubric_fast.integrations.hf import check_linear_head

            self.entropy_selection = entropy_selection
            self.rubric_fast_mapping()  # refuse unsupported settings now, not at the first step
            if self.aux_loss_enabled:
                raise _refuse("router_aux_loss_coef", self.router_aux_loss_coef,
                              "the MoE load-balancing loss is not computed by the fused path",
                              "Set router_aux_loss_coef=0.0, or use TRL's own GRPOTrainer.")
            check_linear_head(self.model)
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            _install_loss_forward(base)

        def rubric_fast_mapping(self) -> TRLLossMapping:
            """The current GRPOConfig mapped onto the fused op (recomputed each step: cheap)."""
            return policy_loss_mapping(self.args, entropy_selection=self.entropy_selection)

        def _compute_loss(self, model, inputs):
            from rubric_fast.integrations.hf import hidden_states_and_head
            from rubric_fast.ops import fused_linear_policy_loss

            present = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
            if present:
                raise UnsupportedTRLConfig(f"RubricFastGRPOTrainer: multimodal inputs ({', '.join(present)}) are not "
                                           "supported by the fused path; use TRL's own GRPOTrainer for VLMs")
            mp = self.rubric_fast_mapping()
            mode = "train" if self.model.training else "eval"
            prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            bsz, clen = completion_ids.shape
            mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
            maskf = mask.float()

            advantages = inputs["advantages"]
            adv_tok = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand(bsz, clen)
            old = inputs.get("old_per_token_logps")
            ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
            use_is = self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo"
            is_ratio = inputs.get("importance_sampling_ratio") if use_is else None
            if is_ratio is not None and mp.sequence_level and is_ratio.dim() == 2 and is_ratio.shape[1] != 1:
                raise _refuse("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode,
                              "token-level IS ratios with importance_sampling_level='sequence' weigh the sequence "
                              "ratio per token; the fused GSPO-token loss cannot", "Use a sequence_* mode.")
            quantile = mp.top_entropy_quantile < 1.0 and mp.entropy_selection == "quantile"
            need_prepass = old is None or self.off_policy_mask_threshold is not None or quantile
            cfg = mp.for_batch(
                num_seqs=bsz, num_tokens=float(maskf.sum()), grad_accum_steps=self.current_gradient_accumulation_steps
                if mode == "train" else 1,
                num_items_in_batch=(float(inputs["num_items_in_batch"]) if "num_items_in_batch" in inputs else None),
                num_processes=self.accelerator.num_processes, steps_per_generation=self.args.steps_per_generation,
                training=mode == "train")
            targets = completion_ids.masked_fill(mask == 0, -100).reshape(-1)
            weights = maskf.reshape(-1)
            seq_index = torch.arange(bsz, device=targets.device).repeat_interleave(clen)
            process_group = _default_process_group(self.accelerator)
            trainer = self
            extra: dict[str, Any] = {}

            def run(base_model, input_ids, attention_mask):
                hidden, weight, bias = hidden_states_and_head(base_model, input_ids, attention_mask)
                h = hidden[:, -clen - 1:-1, :]
                if h.dtype != weight.dtype:
                    h = h.to(weight.dtype)
                h = h.reshape(-1, h.shape[-1])
                old_flat = None if old is None else old.reshape(-1).float()
                is_weight = None if is_ratio is None else is_ratio.expand(bsz, clen).reshape(-1).float()
                with torch.autocast(h.device.type, enabled=False):
                    if need_prepass:
                        old_flat, is_weight = _prepass(trainer, h, weight, bias, targets, mp, inputs, old_flat,
                                                       is_weight, adv_tok, advantages.dim(), mask, quantile, extra)
                    loss, _stats, logp, ent = fused_linear_policy_loss(
                        h, weight, targets, old_flat, adv_tok.reshape(-1).float(), weights,
                        ref_logp=None if ref is None else ref.reshape(-1).float(), is_weight=is_weight,
                        seq_index=seq_index, config=cfg, bias=bias, temperature=mp.temperature,
                        process_group=process_group)
                extra["old"] = old_flat.view(bsz, clen)
                return {"loss": loss, "logp": logp.view(bsz, clen), "entropy": ent.view(bsz, clen)}

            with self.accelerator.autocast():
                out = model(input_ids=input_ids, attention_mask=attention_mask, rubric_fast_loss=run)
            loss = out["loss"]
            self._log_rubric_fast_metrics(mode, mp, cfg, out["logp"], out["entropy"], extra["old"], adv_tok, mask,
                                          ref, extra.get("entropy_mask"), loss)
            return loss

        def _log_rubric_fast_metrics(self, *args):
            _log_metrics(self, *args)

    RubricFastGRPOTrainer.__module__ = __name__
    return RubricFastGRPOTrainer


def __getattr__(name: str):
    # built on first use, so that the reward functions above work without TRL installed
    if name == "RubricFastGRPOTrainer":
        try:
            cls = _make_trainer_class()
        except ImportError as exc:
            raise ImportError(f"RubricFastGRPOTrainer needs TRL: pip install trl (tested with 1.16) ({exc})") from exc
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
