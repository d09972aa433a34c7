"""``rubric_fast::policy_loss`` and ``rubric_fast::fused_linear_policy_loss``: registration, autograd, dispatch.

Both ops compute their gradients in the forward pass (the per-token coefficients dL/dlogp and dL/dentropy
are known as soon as the loss is), and their backward only scales them by the upstream gradient of the
scalar loss. This is what lets the fused op never hold the logits and never run a separate backward
over the vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference.entropy_mask import topk_mask, selection_count
from ..reference.policy_loss import policy_loss_with_grads
from ..reference.types import PolicyLossConfig, PolicyLossStats
from . import backend as _backend
from ._checks import check_same_device, check_vector, out_dtype
from .linear import backward_impl, check_lle_inputs, forward_impl

_SUPPORTED = ("torch", "cpu", "cuda", "triton")


def config_args(cfg: PolicyLossConfig) -> tuple:
    """The config as the flat scalars the kernels take (<= 0 means 'not set')."""
    return (cfg.loss_code, float(cfg.eps_low), float(cfg.eps_high), float(cfg.delta or -1.0),
            float(cfg.dual_clip or -1.0), float(cfg.beta), cfg.kl_code, float(cfg.entropy_coef),
            cfg.aggregation_code, float(cfg.normalizer or -1.0), float(cfg.sapo_tau_pos), float(cfg.sapo_tau_neg))


def config_from_args(loss_type, eps_low, eps_high, delta, dual_clip, beta, kl_type, entropy_coef, aggregation,
                     normalizer, sapo_tau_pos, sapo_tau_neg) -> PolicyLossConfig:
    from ..reference.types import AGGREGATIONS, KL_ESTIMATORS, LOSSES

    return PolicyLossConfig(
        loss=LOSSES[loss_type], eps_low=eps_low, eps_high=eps_high, delta=delta if delta > 0 else None,
        dual_clip=dual_clip if dual_clip > 0 else None, beta=beta, kl=KL_ESTIMATORS[kl_type],
        entropy_coef=entropy_coef, aggregation=AGGREGATIONS[aggregation],
        normalizer=normalizer if normalizer > 0 else None, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg)


def policy_loss_impl(be, logp, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index, entropy,
                     entropy_mask, cfg_args):
    if be in ("cpu", "cuda"):
        return tuple(torch.ops.rubric_fast.policy_loss_native(
            logp, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index, entropy, entropy_mask,
            *cfg_args))
    if be == "triton":
        from ..kernels.policy_loss import policy_loss_fwd_bwd

        return tuple(policy_loss_fwd_bwd(logp, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index,
                                         entropy, entropy_mask, *cfg_args))
    return policy_loss_with_grads(logp, old_logp, advantages, loss_weight, ref_logp=ref_logp, is_weight=is_weight,
                                  seq_index=seq_index, config=config_from_args(*cfg_args), entropy=entropy,
                                  entropy_mask=entropy_mask)


@torch.library.custom_op("rubric_fast::policy_loss", mutates_args=())
def _policy_loss_op(logp: Tensor, old_logp: Tensor, advantages: Tensor, loss_weight: Tensor,
                    ref_logp: Tensor | None, is_weight: Tensor | None, seq_index: Tensor | None,
                    entropy: Tensor | None, entropy_mask: Tensor | None, loss_type: int, eps_low: float,
                    eps_high: float, delta: float, dual_clip: float, beta: float, kl_type: int,
                    entropy_coef: float, aggregation: int, normalizer: float, sapo_tau_pos: float,
                    sapo_tau_neg: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg_args = (loss_type, eps_low, eps_high, delta, dual_clip, beta, kl_type, entropy_coef, aggregation,
                normalizer, sapo_tau_pos, sapo_tau_neg)
    dt = out_dtype(logp)
    loss, stats, g_lp, g_ent = policy_loss_impl(backend, logp, old_logp, advantages, loss_weight, ref_logp,
                                                is_weight, seq_index, entropy, entropy_mask, cfg_args)
    return (loss.to(dt).reshape(()).clone(), stats.float().reshape(4).clone(), g_lp.to(dt).contiguous(),
            g_ent.to(dt).contiguous())


@_policy_loss_op.register_fake
def _(logp, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index, entropy, entropy_mask, *args):
    dt = out_dtype(logp)
    n = logp.shape[0]
    return (logp.new_empty((), dtype=dt), logp.new_empty(4, dtype=torch.float32), logp.new_empty(n, dtype=dt),
            logp.new_empty(n, dtype=dt))


def _pl_setup(ctx, inputs, output):
    _, _, g_lp, g_ent = output
    ctx.save_for_backward(g_lp, g_ent)
    ctx.dtypes = (inputs[0].dtype, None if inputs[7] is None else inputs[7].dtype)


def _pl_backward(ctx, g_loss, g_stats, g_glp, g_gent):
    g_lp, g_ent = ctx.saved_tensors
    needs = ctx.needs_input_grad
    d_logp = (g_loss * g_lp).to(ctx.dtypes[0]) if needs[0] else None
    d_ent = (g_loss * g_ent).to(ctx.dtypes[1]) if (needs[7] and ctx.dtypes[1] is not None) else None
    return (d_logp, None, None, None, None, None, None, d_ent) + (None,) * 14


_policy_loss_op.register_autograd(_pl_backward, setup_context=_pl_setup)


def _check_policy_inputs(n, config, *, fused=False, hidden=None, logp=None, old_logp, advantages, loss_weight,
                         ref_logp, is_weight, seq_index, entropy, entropy_mask):
    """Shapes, dtypes, devices and config-dependent requirements of the policy-loss arguments.

    ``fused``: the fused op computes log-probs and entropy itself, so ``old_logp`` may be None (on-policy)
    and ``entropy`` is not an argument; its ``hidden`` must share the device of the other arguments.
    """
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config: expected a PolicyLossConfig, got {type(config).__name__}")
    check_vector("logp", logp, n)
    check_vector("old_logp", old_logp, n, optional=fused)
    check_vector("advantages", advantages, n, optional=False)
    check_vector("loss_weight", loss_weight, n, optional=False)
    check_vector("ref_logp", ref_logp, n)
    check_vector("is_weight", is_weight, n)
    check_vector("entropy", entropy, n)
    check_vector("entropy_mask", entropy_mask, n)
    check_vector("seq_index", seq_index, n, floating=False)
    if seq_index is not None and seq_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"seq_index: expected int64, got {seq_index.dtype}")
    if (config.loss == "gspo" or config.aggregation.startswith("seq_")) and seq_index is None:
        raise ValueError(f"seq_index: required for loss={config.loss!r} / aggregation={config.aggregation!r}")
    if config.beta > 0 and ref_logp is None:
        raise ValueError("ref_logp: required when config.beta > 0")
    if not fused and config.entropy_coef != 0 and entropy is None:
        raise ValueError("entropy: required when config.entropy_coef != 0")
    check_same_device(hidden=hidden, logp=logp, old_logp=old_logp, advantages=advantages, loss_weight=loss_weight,
                      ref_logp=ref_logp, is_weight=is_weight, seq_index=seq_index, entropy=entropy,
                      entropy_mask=entropy_mask)


def _c(t):
    return None if t is None else t.contiguous()


def _mask_arg(m):
    return None if m is None else m.to(torch.float32).contiguous()


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, loss_weight: Tensor, *,
                ref_logp: Tensor | None = None, is_weight: Tensor | None = None, seq_index: Tensor | None = None,
                config: PolicyLossConfig, entropy: Tensor | None = None, entropy_mask: Tensor | None = None):
    """GRPO-family policy loss over N tokens -> (loss scalar, :class:`PolicyLossStats`). See docs/ops-math.md."""
    if not isinstance(logp, Tensor) or logp.dim() != 1:
        raise ValueError(f"logp: expected shape [N], got {tuple(getattr(logp, 'shape', ()))}")
    _check_policy_inputs(logp.shape[0], config, logp=logp, old_logp=old_logp, advantages=advantages,
                         loss_weight=loss_weight, ref_logp=ref_logp, is_weight=is_weight, seq_index=seq_index,
                         entropy=entropy, entropy_mask=entropy_mask)
    be = _backend.select(logp.device, "policy_loss", _SUPPORTED)
    loss, stats, _, _ = _policy_loss_op(
        logp.contiguous(), old_logp.detach().contiguous(), advantages.detach().contiguous(),
        loss_weight.detach().contiguous(), _c(ref_logp), _c(is_weight), _c(seq_index), _c(entropy),
        _mask_arg(entropy_mask), *config_args(config), be)
    return loss, PolicyLossStats(*stats.unbind(0))


# ----------------------------------------------------------------------------------------------------------
# fused: linear -> log-prob / entropy -> (entropy selection) -> loss, gradients computed in the forward


def _fused_impl(be, hidden, weight, targets, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index,
                entropy_mask, bias, temperature, ignore_index, cfg_args, top_entropy_fraction, needs):
    if be == "triton":
        from ..kernels.fused_linear_policy_loss import fused_linear_policy_loss_fwd_bwd

        return fused_linear_policy_loss_fwd_bwd(
            hidden, weight, targets, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index,
            None if entropy_mask is None else entropy_mask != 0, *cfg_args, top_entropy_fraction, bias,
            temperature, ignore_index, *needs)
    logp, ent, lse = forward_impl(be, hidden, weight, targets, bias, temperature, ignore_index)
    if old_logp is None:  # on-policy: the old policy is this forward's own, ratio 1
        old_logp = logp
    if entropy_mask is None and top_entropy_fraction > 0:
        valid = (loss_weight != 0) & (targets != ignore_index)
        entropy_mask = topk_mask(ent.float(), valid, selection_count(top_entropy_fraction, int(valid.sum())))
        entropy_mask = entropy_mask.to(torch.float32)
    entropy_coef = cfg_args[7]
    loss, stats, g_lp, g_ent = policy_loss_impl(
        "cpu" if be == "cpu" else ("cuda" if be == "cuda" else "torch"), logp, old_logp, advantages, loss_weight,
        ref_logp, is_weight, seq_index, ent if entropy_coef != 0 else None, entropy_mask, cfg_args)
    dx = dw = db = None
    if any(needs):
        dx, dw, db = backward_impl(be, hidden, weight, targets, bias, lse, ent, g_lp, g_ent, temperature,
                                   ignore_index, needs)
    return loss, stats, logp, ent, dx, dw, db


@torch.library.custom_op("rubric_fast::fused_linear_policy_loss", mutates_args=())
def _fused_op(hidden: Tensor, weight: Tensor, targets: Tensor, old_logp: Tensor | None, advantages: Tensor,
              loss_weight: Tensor, ref_logp: Tensor | None, is_weight: Tensor | None, seq_index: Tensor | None,
              entropy_mask: Tensor | None, bias: Tensor | None, temperature: float, ignore_index: int,
              loss_type: int, eps_low: float, eps_high: float, delta: float, dual_clip: float, beta: float,
              kl_type: int, entropy_coef: float, aggregation: int, normalizer: float, sapo_tau_pos: float,
              sapo_tau_neg: float, top_entropy_fraction: float, needs_dhidden: bool, needs_dweight: bool,
              needs_dbias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg_args = (loss_type, eps_low, eps_high, delta, dual_clip, beta, kl_type, entropy_coef, aggregation,
                normalizer, sapo_tau_pos, sapo_tau_neg)
    needs = (needs_dhidden, needs_dweight, needs_dbias and bias is not None)
    dt = out_dtype(hidden, weight, bias)
    loss, stats, logp, ent, dx, dw, db = _fused_impl(
        backend, hidden, weight, targets, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index,
        entropy_mask, bias, temperature, ignore_index, cfg_args, top_entropy_fraction, needs)
    def e():  # a fresh empty tensor each time: outputs may not alias each other
        return hidden.new_empty(0, dtype=torch.float32)

    # gradients were accumulated in fp32 by the backend and cast once to the parameter dtype
    return (loss.to(dt).reshape(()).clone(), stats.float().reshape(4).clone(), logp.to(dt).contiguous(),
            ent.to(dt).contiguous(),
            e() if dx is None or not needs[0] else dx.contiguous(),
            e() if dw is None or not needs[1] else dw.contiguous(),
            e() if db is None or not needs[2] else db.contiguous())


@_fused_op.register_fake
def _(hidden, weight, targets, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index, entropy_mask,
      bias, temperature, ignore_index, *rest):
    needs_dhidden, needs_dweight, needs_dbias = rest[-4], rest[-3], rest[-2]
    dt = out_dtype(hidden, weight, bias)
    n = hidden.shape[0]
    def e():
        return hidden.new_empty(0, dtype=torch.float32)

    return (hidden.new_empty((), dtype=dt), hidden.new_empty(4, dtype=torch.float32), hidden.new_empty(n, dtype=dt),
            hidden.new_empty(n, dtype=dt),
            hidden.new_empty(hidden.shape, dtype=hidden.dtype) if needs_dhidden else e(),
            weight.new_empty(weight.shape, dtype=weight.dtype) if needs_dweight else e(),
            bias.new_empty(bias.shape, dtype=bias.dtype) if (needs_dbias and bias is not None) else e())


def _fused_setup(ctx, inputs, output):
    dx, dw, db = output[4], output[5], output[6]
    ctx.save_for_backward(dx, dw, db)
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype, None if inputs[10] is None else inputs[10].dtype)


def _fused_backward(ctx, g_loss, *unused):
    dx, dw, db = ctx.saved_tensors
    needs = ctx.needs_input_grad

    def scale(g, dtype, need):
        return (g_loss * g).to(dtype) if need and g.numel() > 0 else None

    return (scale(dx, ctx.dtypes[0], needs[0]), scale(dw, ctx.dtypes[1], needs[1])) + (None,) * 8 + (
        scale(db, ctx.dtypes[2], needs[10]) if ctx.dtypes[2] is not None else None,) + (None,) * 19


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


def fused_linear_policy_loss(hidden: Tensor, weight: Tensor, targets: Tensor, old_logp: Tensor | None,
                             advantages: Tensor,
                             loss_weight: Tensor, *, ref_logp: Tensor | None = None, is_weight: Tensor | None = None,
                             seq_index: Tensor | None = None, entropy_mask: Tensor | None = None,
                             config: PolicyLossConfig, bias: Tensor | None = None, temperature: float = 1.0,
                             ignore_index: int = -100, process_group=None):
    """The one-call hot path: hidden states -> log-prob / entropy -> policy loss, with its backward.

    Returns (loss, stats, logp, entropy); ``logp`` and ``entropy`` are detached diagnostics (fp32).
    ``old_logp=None`` means on-policy (one update per batch of rollouts): the old log-probs are this
    forward's own, detached, so no separate no-grad pass is needed. Tokens
    whose ``targets`` equal ``ignore_index`` must have ``loss_weight`` 0. With
    ``config.top_entropy_fraction`` and no ``entropy_mask``, the mask is computed between the forward and
    the backward; with a ``process_group`` the selection threshold is global across its ranks.
    """
    check_lle_inputs(hidden, weight, targets, bias)
    _check_policy_inputs(hidden.shape[0], config, fused=True, hidden=hidden, old_logp=old_logp,
                         advantages=advantages, loss_weight=loss_weight, ref_logp=ref_logp, is_weight=is_weight,
                         seq_index=seq_index, entropy=None, entropy_mask=entropy_mask)
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    be = _backend.select(hidden.device, "fused_linear_policy_loss", _SUPPORTED)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    top = float(config.top_entropy_fraction or -1.0)
    if entropy_mask is None and config.top_entropy_fraction is not None and process_group is not None:
        # global threshold across ranks: forward once without grad, select, then the fused call
        from .small import entropy_mask as _entropy_mask
        from .linear import linear_logprob_entropy as _lle

        with torch.no_grad():
            _, ent, _ = _lle(hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index)
        valid = (loss_weight != 0) & (targets != ignore_index)
        entropy_mask = _entropy_mask(ent, valid, config.top_entropy_fraction, process_group=process_group)
    loss, stats, logp, ent, _, _, _ = _fused_op(
        hidden.contiguous(), weight.contiguous(), targets.long().contiguous(),
        None if old_logp is None else old_logp.detach().contiguous(),
        advantages.detach().contiguous(), loss_weight.detach().contiguous(), _c(ref_logp), _c(is_weight),
        _c(seq_index), _mask_arg(entropy_mask), _c(bias), float(temperature), int(ignore_index),
        *config_args(config), top, bool(needs[0]), bool(needs[1]), bool(needs[2]), be)
    return loss, PolicyLossStats(*stats.unbind(0)), logp.detach(), ent.detach()
