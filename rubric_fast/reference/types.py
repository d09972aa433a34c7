"""Configuration and result types shared by every backend of the policy losses."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from rubric_fast.settings import check_fields, setting

LOSSES = ("ppo_clip", "cispo", "sapo", "gspo")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant")


# Layout of PolicyLossConfig.to_op_args(); csrc/include/rubric_fast/policy_params.h mirrors it.
FPARAMS = ("eps_low", "eps_high", "delta", "dual_clip", "beta", "entropy_coef", "normalizer", "sapo_tau_pos",
           "sapo_tau_neg", "top_entropy_fraction")
IPARAMS = ("loss", "kl", "aggregation")


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"PolicyLossConfig.{field}: {msg}")


@dataclass
class PolicyLossConfig:
    """Every variant of the clipped policy loss that the trainer and other trainers need.

    loss:
        ``ppo_clip`` (PPO, Schulman et al. 2017; with ``eps_high`` > ``eps_low`` this is DAPO's
        clip-higher, Yu et al. 2025), ``cispo`` (MiniMax-M1, 2025: clipped, detached IS weight times
        log-prob), ``sapo`` (Soft Adaptive Policy Optimization, Gao et al. 2025: sigmoid gate instead of
        a hard clip) or ``gspo`` (Group Sequence Policy Optimization, Zheng et al. 2025: sequence-level
        ratio, GSPO-token form).
    eps_low, eps_high:
        clip range ``[1 - eps_low, 1 + eps_high]``. ``cispo`` uses only ``eps_high``.
    delta:
        two-sided clipping (TRL's ``delta``, INTELLECT-2): the unclipped ratio is capped at ``delta``.
    dual_clip:
        dual-clip PPO (Ye et al. 2020): for negative advantages the loss is at most ``dual_clip * |A|``.
    beta, kl:
        KL penalty weight against a reference policy and its estimator (Schulman 2020, "Approximating
        KL divergence"): ``k1 = log pi - log ref``, ``k2 = (log ref - log pi)^2 / 2``,
        ``k3 = exp(log ref - log pi) - (log ref - log pi) - 1``.
    entropy_coef:
        the per-token loss is reduced by ``entropy_coef * entropy`` (an entropy bonus).
    aggregation, normalizer:
        ``token_mean``: sum of weighted token losses over ``normalizer`` (a global token count) or, when
        None, over the local sum of loss weights. ``seq_mean_token_mean`` / ``seq_mean_token_sum``: mean
        over sequences of the per-sequence token mean / sum; ``normalizer`` then is the global number of
        sequences. ``constant`` (Dr. GRPO, Liu et al. 2025): sum over a fixed constant ``normalizer``
        (e.g. max completion length x number of sequences), which is then required.
    top_entropy_fraction:
        train only on the fraction of valid tokens with the highest entropy ("Beyond the 80/20 rule",
        Wang et al. 2025). The selection zeroes the loss of the other tokens; the normalizer still
        counts every valid token.
    sapo_tau_pos, sapo_tau_neg:
        SAPO gate temperatures for positive / negative advantages.
    """

    loss: str = setting("ppo_clip", "the policy loss: ppo_clip (PPO; DAPO's clip-higher with eps_high > eps_low), "
                        "cispo (MiniMax-M1), sapo (soft gate), gspo (sequence-level ratio)", choices=LOSSES)
    eps_low: float = setting(0.2, "clip range low side: the ratio is clipped at 1 - eps_low")
    eps_high: float = setting(0.2, "clip range high side: 1 + eps_high (DAPO clip-higher: 0.28); cispo's only bound")
    delta: float | None = setting(None, "two-sided clipping (TRL delta, INTELLECT-2): the unclipped ratio is "
                                  "capped at delta (> 1 + eps_high); null = off")
    dual_clip: float | None = setting(None, "dual-clip PPO: for negative advantages the loss is at most "
                                      "dual_clip * |A| (> 1); null = off")
    beta: float = setting(0.0, "KL penalty weight against the reference policy (0 = no reference model)")
    kl: str = setting("k3", "KL estimator: k1 = log pi - log ref, k2 = squared, k3 = the unbiased low-variance one",
                      choices=KL_ESTIMATORS)
    entropy_coef: float = setting(0.0, "entropy bonus: the per-token loss is reduced by entropy_coef * entropy")
    aggregation: str = setting("token_mean", "how token losses become the loss: token_mean (DAPO), "
                               "seq_mean_token_mean (GRPO), seq_mean_token_sum, constant (Dr. GRPO: a sum over "
                               "max_new_tokens x sequences)", choices=AGGREGATIONS)
    normalizer: float | None = setting(None, "the loss's denominator", internal="set by the trainer for each "
                                       "optimizer step (the global token or sequence count)")
    top_entropy_fraction: float | None = setting(None, "train only on this fraction of the valid tokens with the "
                                                 "highest entropy (the 80/20 rule); null = every token")
    sapo_tau_pos: float = setting(1.0, "SAPO gate temperature for positive advantages")
    sapo_tau_neg: float = setting(1.05, "SAPO gate temperature for negative advantages")

    def __post_init__(self) -> None:
        check_fields(self, "PolicyLossConfig.")  # the declared choices (loss, kl, aggregation)
        for name in ("eps_low", "eps_high", "beta", "entropy_coef", "sapo_tau_pos", "sapo_tau_neg"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and math.isfinite(v), name, f"must be a finite number, got {v!r}")
        _check(0.0 <= self.eps_low < 1.0, "eps_low", f"must be in [0, 1), got {self.eps_low}")
        _check(self.eps_high >= 0.0, "eps_high", f"must be >= 0, got {self.eps_high}")
        _check(self.beta >= 0.0, "beta", f"must be >= 0, got {self.beta}")
        _check(self.sapo_tau_pos > 0, "sapo_tau_pos", f"must be > 0, got {self.sapo_tau_pos}")
        _check(self.sapo_tau_neg > 0, "sapo_tau_neg", f"must be > 0, got {self.sapo_tau_neg}")
        if self.delta is not None:
            _check(math.isfinite(self.delta) and self.delta > 1.0 + self.eps_high, "delta",
                   f"must be > 1 + eps_high = {1 + self.eps_high}, got {self.delta}")
        if self.dual_clip is not None:
            _check(math.isfinite(self.dual_clip) and self.dual_clip > 1.0, "dual_clip",
                   f"must be > 1, got {self.dual_clip}")
        if self.normalizer is not None:
            _check(math.isfinite(self.normalizer) and self.normalizer > 0, "normalizer",
                   f"must be > 0, got {self.normalizer}")
        if self.aggregation == "constant":
            _check(self.normalizer is not None, "normalizer",
                   "aggregation='constant' (Dr. GRPO) needs a constant normalizer, e.g. max_new_tokens * n_seqs")
        if self.top_entropy_fraction is not None:
            _check(0.0 < self.top_entropy_fraction <= 1.0, "top_entropy_fraction",
                   f"must be in (0, 1], got {self.top_entropy_fraction}")

    def replace(self, **changes) -> PolicyLossConfig:
        d = asdict(self)
        d.update(changes)
        return PolicyLossConfig(**d)

    # ------------------------------------------------------------------------------------------
    # The one packed form that crosses every op schema (Python custom ops, the C++ schema, the CUDA and
    # Triton launchers): ``(float[] fparams, int[] iparams)``. Unset optional floats are -1.
    def to_op_args(self) -> tuple[list[float], list[int]]:
        """-> (fparams, iparams), the layout of FPARAMS / IPARAMS (csrc/include/rubric_fast/policy_params.h)."""
        def opt(x):
            return -1.0 if x is None else float(x)

        fparams = [float(self.eps_low), float(self.eps_high), opt(self.delta), opt(self.dual_clip), float(self.beta),
                   float(self.entropy_coef), opt(self.normalizer), float(self.sapo_tau_pos),
                   float(self.sapo_tau_neg), opt(self.top_entropy_fraction)]
        return fparams, [self.loss_code, self.kl_code, self.aggregation_code]

    @classmethod
    def from_op_args(cls, fparams, iparams) -> PolicyLossConfig:
        """The inverse of :meth:`to_op_args` (validated again: a packed config from elsewhere is checked)."""
        if len(fparams) != len(FPARAMS) or len(iparams) != len(IPARAMS):
            raise ValueError(f"packed PolicyLossConfig: expected {len(FPARAMS)} floats and {len(IPARAMS)} ints, "
                             f"got {len(fparams)} and {len(iparams)}")
        f = dict(zip(FPARAMS, (float(x) for x in fparams)))
        i = dict(zip(IPARAMS, (int(x) for x in iparams)))
        for name, codes in (("loss", LOSSES), ("kl", KL_ESTIMATORS), ("aggregation", AGGREGATIONS)):
            _check(0 <= i[name] < len(codes), name, f"code {i[name]} out of range 0..{len(codes) - 1}")

        def opt(x):
            return None if x <= 0 else x

        return cls(loss=LOSSES[i["loss"]], kl=KL_ESTIMATORS[i["kl"]], aggregation=AGGREGATIONS[i["aggregation"]],
                   eps_low=f["eps_low"], eps_high=f["eps_high"], delta=opt(f["delta"]), dual_clip=opt(f["dual_clip"]),
                   beta=f["beta"], entropy_coef=f["entropy_coef"], normalizer=opt(f["normalizer"]),
                   sapo_tau_pos=f["sapo_tau_pos"], sapo_tau_neg=f["sapo_tau_neg"],
                   top_entropy_fraction=opt(f["top_entropy_fraction"]))

    # Integer codes of the string fields.
    @property
    def loss_code(self) -> int:
        return LOSSES.index(self.loss)

    @property
    def kl_code(self) -> int:
        return KL_ESTIMATORS.index(self.kl)

    @property
    def aggregation_code(self) -> int:
        return AGGREGATIONS.index(self.aggregation)


class PolicyLossStats(NamedTuple):
    """Diagnostics of one policy-loss call, each an fp32 scalar tensor (means over tokens with weight != 0).

    clip_frac_low: tokens with ratio < 1 - eps_low and negative advantage.
    clip_frac_high: tokens with ratio > 1 + eps_high and positive advantage.
    kl_mean: mean KL estimate against the reference (0 without ``ref_logp``).
    ratio_mean: mean importance ratio pi / pi_old (the GSPO token ratio for ``gspo``).
    """

    clip_frac_low: torch.Tensor
    clip_frac_high: torch.Tensor
    kl_mean: torch.Tensor
    ratio_mean: torch.Tensor
