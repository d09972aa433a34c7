"""``rubric_fast::policy_loss`` and ``rubric_fast::fused_linear_policy_loss``: registration, autograd, dispatch.

Both ops compute their gradients in the forward pass (the per-token coefficients dL/dlogp and dL/dentropy
are known as soon as the loss is), and their backward only scales them by the upstream gradient of the
scalar loss. This is what lets the fused op never hold the logits and never run a separate backward
over the vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference.entropy_mask import selection_count, topk_mask
from ..reference.policy_loss import policy_loss_with_grads
from ..reference.types import PolicyLossConfig, PolicyLossStats
from . import backend as _backend
from ._checks import check_same_device, check_vector, out_dtype
from .linear import BACKWARD, FORWARD, check_lle_inputs

# ----------------------------------------------------------------------------------------------------------
# policy_loss: one implementation per backend; absent means unsupported


def _pl_native(cfg, *tensors):
    return tuple(torch.ops.rubric_fast.policy_loss_native(*tensors, *cfg.to_op_args()))


def _pl_triton(cfg, *tensors):
    from ..kernels.policy_loss import policy_loss_fwd_bwd

    return tuple(policy_loss_fwd_bwd(*tensors, cfg))


def _pl_torch(cfg, logp, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index, entropy, entropy_mask):
    return policy_loss_with_grads(logp, old_logp, advantages, loss_weight, ref_logp=ref_logp, is_weight=is_weight,
                                  seq_index=seq_index, config=cfg, entropy=entropy, entropy_mask=entropy_mask)


# backend -> (config, logp, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index, entropy,
# entropy_mask) -> (loss, stats f32[4], grad_logp, grad_entropy)
POLICY_LOSS = {"torch": _pl_torch, "cpu": _pl_native, "cuda": _pl_native, "triton": _pl_triton}


@torch.library.custom_op("rubric_fast::policy_loss", mutates_args=())
def _policy_loss_op(logp: Tensor, old_logp: Tensor, advantages: Tensor, loss_weight: Tensor,
                    ref_logp: Tensor | None, is_weight: Tensor | None, seq_index: Tensor | None,
                    entropy: Tensor | None, entropy_mask: Tensor | None, fparams: list[float], iparams: list[int],
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg = PolicyLossConfig.from_op_args(fparams, iparams)
    dt = out_dtype(logp)
    loss, stats, g_lp, g_ent = POLICY_LOSS[backend](cfg, logp, old_logp, advantages, loss_weight, ref_logp,
                                                    is_weight, seq_index, entropy, entropy_mask)
    return (loss.to(dt).reshape(()).clone(), stats.float().reshape(4).clone(), g_lp.to(dt).contiguous(),
            g_ent.to(dt).contiguous())


@_policy_loss_op.register_fake
def _(logp, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index, entropy, entropy_mask, *args):
    dt = out_dtype(logp)
    n = logp.shape[0]
    return (logp.new_empty((), dtype=dt), logp.new_empty(4, dtype=torch.float32), logp.new_empty(n, dtype=dt),
            logp.new_empty(n, dtype=dt))


_PL_ENTROPY = 7  # index of ``entropy`` among the op's inputs


def _pl_setup(ctx, inputs, output):
    _, _, g_lp, g_ent = output
    ctx.save_for_backward(g_lp, g_ent)
    ctx.dtypes = (inputs[0].dtype, None if inputs[_PL_ENTROPY] is None else inputs[_PL_ENTROPY].dtype)
    ctx.n_inputs = len(inputs)


def _pl_backward(ctx, g_loss, g_stats, g_glp, g_gent):
    g_lp, g_ent = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = [None] * ctx.n_inputs
    if needs[0]:
        grads[0] = (g_loss * g_lp).to(ctx.dtypes[0])
    if needs[_PL_ENTROPY] and ctx.dtypes[1] is not None:
        grads[_PL_ENTROPY] = (g_loss * g_ent).to(ctx.dtypes[1])
    return tuple(grads)


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
    be = _backend.select(logp.device, "policy_loss", tuple(POLICY_LOSS))
    loss, stats, _, _ = _policy_loss_op(
        logp.contiguous(), old_logp.detach().contiguous(), advantages.detach().contiguous(),
        loss_weight.detach().contiguous(), _c(ref_logp), _c(is_weight), _c(seq_index), _c(entropy),
        _mask_arg(entropy_mask), *config.to_op_args(), be)
    return loss, PolicyLossStats(*stats.unbind(0))


# ----------------------------------------------------------------------------------------------------------
# fused: linear -> log-prob / entropy -> (entropy selection) -> loss, gradients computed in the forward


def _fused_triton(cfg, hidden, weight, targets, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index,
                  entropy_mask, bias, temperature, ignore_index, needs):
    from ..kernels.fused_linear_policy_loss import fused_linear_policy_loss_fwd_bwd

    return fused_linear_policy_loss_fwd_bwd(
        hidden, weight, targets, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index,
        None if entropy_mask is None else entropy_mask != 0, cfg, None, bias, temperature, ignore_index, *needs)


def _fused_composed(be):
    """Forward op, policy loss, recompute backward of the same backend (torch, cpu, cuda)."""

    def run(cfg, hidden, weight, targets, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index,
            entropy_mask, bias, temperature, ignore_index, needs):
        logp, ent, lse = FORWARD[be](hidden, weight, targets, bias, temperature, ignore_index)
        if old_logp is None:  # on-policy: the old policy is this forward's own, ratio 1
            old_logp = logp
        if entropy_mask is None and cfg.top_entropy_fraction is not None:
            valid = (loss_weight != 0) & (targets != ignore_index)
            entropy_mask = topk_mask(ent.float(), valid,
                                     selection_count(cfg.top_entropy_fraction, int(valid.sum()))).to(torch.float32)
        loss, stats, g_lp, g_ent = POLICY_LOSS[be](cfg, logp, old_logp, advantages, loss_weight, ref_logp, is_weight,
                                                   seq_index, ent if cfg.entropy_coef != 0 else None, entropy_mask)
        dx = dw = db = None
        if any(needs):
            dx, dw, db = BACKWARD[be](hidden, weight, targets, bias, lse, ent, g_lp, g_ent, temperature,
                                      ignore_index, needs)
        return loss, stats, logp, ent, dx, dw, db

    return run


# backend -> the whole fused call -> (loss, stats, logp, entropy, dhidden | None, dweight | None, dbias | None)
FUSED = {"torch": _fused_composed("torch"), "cpu": _fused_composed("cpu"), "cuda": _fused_composed("cuda"),
         "triton": _fused_triton}


@torch.library.custom_op("rubric_fast::fused_linear_policy_loss", mutates_args=())
def _fused_op(hidden: Tensor, weight: Tensor, targets: Tensor, old_logp: Tensor | None, advantages: Tensor,
              loss_weight: Tensor, ref_logp: Tensor | None, is_weight: Tensor | None, seq_index: Tensor | None,
              entropy_mask: Tensor | None, bias: Tensor | None, temperature: float, ignore_index: int,
              fparams: list[float], iparams: list[int], needs_dhidden: bool, needs_dweight: bool,
              needs_dbias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = PolicyLossConfig.from_op_args(fparams, iparams)
    needs = (needs_dhidden, needs_dweight, needs_dbias and bias is not None)
    dt = out_dtype(hidden, weight, bias)
    loss, stats, logp, ent, dx, dw, db = FUSED[backend](
        cfg, hidden, weight, targets, old_logp, advantages, loss_weight, ref_logp, is_weight, seq_index,
        entropy_mask, bias, temperature, ignore_index, needs)

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
      bias, temperature, ignore_index, fparams, iparams, needs_dhidden, needs_dweight, needs_dbias, backend):
    dt = out_dtype(hidden, weight, bias)
    n = hidden.shape[0]

    def e():
        return hidden.new_empty(0, dtype=torch.float32)

    return (hidden.new_empty((), dtype=dt), hidden.new_empty(4, dtype=torch.float32), hidden.new_empty(n, dtype=dt),
            hidden.new_empty(n, dtype=dt),
            hidden.new_empty(hidden.shape, dtype=hidden.dtype) if needs_dhidden else e(),
            weight.new_empty(weight.shape, dtype=weight.dtype) if needs_dweight else e(),
            bias.new_empty(bias.shape, dtype=bias.dtype) if (needs_dbias and bias is not None) else e())


_HIDDEN, _WEIGHT, _BIAS = 0, 1, 10  # positions among the op's inputs


def _fused_setup(ctx, inputs, output):
    dx, dw, db = output[4], output[5], output[6]
    ctx.save_for_backward(dx, dw, db)
    ctx.dtypes = (inputs[_HIDDEN].dtype, inputs[_WEIGHT].dtype,
                  None if inputs[_BIAS] is None else inputs[_BIAS].dtype)
    ctx.n_inputs = len(inputs)


def _fused_backward(ctx, g_loss, *unused):
    """The gradients were computed in the forward for an upstream gradient of 1: scale them in place (no
    second dW-sized buffer: autograd can take the tensor as the parameter's .grad). A second backward
    through the same graph (retain_graph) is refused by autograd's version check instead of giving
    wrong gradients."""
    dx, dw, db = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = [None] * ctx.n_inputs

    def scale(g, dtype):
        if g.numel() == 0:
            return None
        # in place only in eager mode: a traced backward (torch.compile, AOT) must stay functional
        eager = type(g) is torch.Tensor and type(g_loss) is torch.Tensor and not torch.compiler.is_compiling()
        if eager and g.dtype == dtype:
            return g.mul_(g_loss.to(g.dtype))
        return (g_loss * g).to(dtype)

    if needs[_HIDDEN]:
        grads[_HIDDEN] = scale(dx, ctx.dtypes[0])
    if needs[_WEIGHT]:
        grads[_WEIGHT] = scale(dw, ctx.dtypes[1])
    if ctx.dtypes[2] is not None and needs[_BIAS]:
        grads[_BIAS] = scale(db, ctx.dtypes[2])
    return tuple(grads)


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
    check_lle_inputs(hidden, weight, targets, bias, temperature)
    _check_policy_inputs(hidden.shape[0], config, fused=True, hidden=hidden, old_logp=old_logp,
                         advantages=advantages, loss_weight=loss_weight, ref_logp=ref_logp, is_weight=is_weight,
                         seq_index=seq_index, entropy=None, entropy_mask=entropy_mask)
    be = _backend.select(hidden.device, "fused_linear_policy_loss", tuple(FUSED))
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    if entropy_mask is None and config.top_entropy_fraction is not None and process_group is not None:
        # global threshold across ranks: forward once without grad, select, then the fused call
        from .linear import linear_logprob_entropy as _lle
        from .small import entropy_mask as _entropy_mask

        with torch.no_grad():
            _, ent, _ = _lle(hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index)
        valid = (loss_weight != 0) & (targets != ignore_index)
        entropy_mask = _entropy_mask(ent, valid, config.top_entropy_fraction, process_group=process_group)
    loss, stats, logp, ent, _, _, _ = _fused_op(
        hidden.contiguous(), weight.contiguous(), targets.long().contiguous(),
        None if old_logp is None else old_logp.detach().contiguous(),
        advantages.detach().contiguous(), loss_weight.detach().contiguous(), _c(ref_logp), _c(is_weight),
        _c(seq_index), _mask_arg(entropy_mask), _c(bias), float(temperature), int(ignore_index),
        *config.to_op_args(), bool(needs[0]), bool(needs[1]), bool(needs[2]), be)
    return loss, PolicyLossStats(*stats.unbind(0)), logp.detach(), ent.detach()
