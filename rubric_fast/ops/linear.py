"""``rubric_fast::linear_logprob_entropy``: registration, autograd and backend dispatch."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..reference.linear_logprob_entropy import backward_grads, forward_stats
from . import backend as _backend
from ._checks import check_same_device, out_dtype


def _empty(device):
    return torch.empty(0, device=device, dtype=torch.float32)


def _fwd_native(hidden, weight, targets, bias, temperature, ignore_index):
    return tuple(torch.ops.rubric_fast.linear_logprob_entropy_fwd_native(
        hidden, weight, targets, bias, temperature, ignore_index))


def _fwd_triton(hidden, weight, targets, bias, temperature, ignore_index):
    from ..kernels.linear_logprob_entropy import linear_logprob_entropy_fwd

    return tuple(linear_logprob_entropy_fwd(hidden, weight, targets, bias, temperature, ignore_index))


def _bwd_native(hidden, weight, targets, bias, lse, entropy, g_logp, g_ent, temperature, ignore_index, needs):
    return torch.ops.rubric_fast.linear_logprob_entropy_bwd_native(
        hidden, weight, targets, bias, lse, entropy, g_logp, g_ent, temperature, ignore_index, *needs)


def _bwd_triton(hidden, weight, targets, bias, lse, entropy, g_logp, g_ent, temperature, ignore_index, needs):
    from ..kernels.linear_logprob_entropy import linear_logprob_entropy_bwd

    return linear_logprob_entropy_bwd(hidden, weight, targets, bias, lse, entropy, g_logp, g_ent, temperature,
                                      ignore_index, *needs)


def _bwd_torch(hidden, weight, targets, bias, lse, entropy, g_logp, g_ent, temperature, ignore_index, needs):
    return backward_grads(hidden, weight, targets, bias, lse, entropy, g_logp, g_ent, temperature, ignore_index,
                          needs=needs)


# One table per op: backend -> implementation; absent means unsupported. The native CUDA entry of this op is
# the ATen-chunked fallback of csrc/cpu/linear_logprob_entropy.cpp (the Triton kernels are the fast path).
FORWARD = {"torch": forward_stats, "cpu": _fwd_native, "cuda": _fwd_native, "triton": _fwd_triton}
_BACKWARD_RAW = {"torch": _bwd_torch, "cpu": _bwd_native, "cuda": _bwd_native, "triton": _bwd_triton}


def _backward_impl(be):
    def run(hidden, weight, targets, bias, lse, entropy, g_logp, g_ent, temperature, ignore_index, needs):
        dx, dw, db = _BACKWARD_RAW[be](hidden, weight, targets, bias, lse, entropy, g_logp, g_ent, temperature,
                                       ignore_index, needs)
        dx = dx.to(hidden.dtype) if needs[0] and dx is not None and dx.numel() == hidden.numel() else None
        dw = dw.to(weight.dtype) if needs[1] and dw is not None and dw.numel() == weight.numel() else None
        db = (db.to(bias.dtype) if (bias is not None and needs[2] and db is not None and db.numel() == bias.numel())
              else None)
        return dx, dw, db

    return run


BACKWARD = {be: _backward_impl(be) for be in _BACKWARD_RAW}


@torch.library.custom_op("rubric_fast::linear_logprob_entropy", mutates_args=())
def _lle_op(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, temperature: float,
            ignore_index: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dt = out_dtype(hidden, weight, bias)
    logp, ent, lse = FORWARD[backend](hidden, weight, targets, bias, temperature, ignore_index)
    return logp.to(dt).contiguous(), ent.to(dt).contiguous(), lse.to(dt).contiguous()


@_lle_op.register_fake
def _(hidden, weight, targets, bias, temperature, ignore_index, backend):
    dt = out_dtype(hidden, weight, bias)
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt))


@torch.library.custom_op("rubric_fast::linear_logprob_entropy_backward", mutates_args=())
def _lle_bwd_op(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, lse: Tensor,
                entropy: Tensor, grad_logp: Tensor, grad_entropy: Tensor, temperature: float, ignore_index: int,
                needs_dhidden: bool, needs_dweight: bool, needs_dbias: bool,
                backend: str) -> tuple[Tensor, Tensor, Tensor]:
    needs = (needs_dhidden, needs_dweight, needs_dbias and bias is not None)
    dx, dw, db = BACKWARD[backend](hidden, weight, targets, bias, lse, entropy, grad_logp, grad_entropy,
                                   temperature, ignore_index, needs)
    e = hidden.device  # each empty output is its own tensor: outputs may not alias each other
    return (_empty(e) if dx is None else dx.contiguous(), _empty(e) if dw is None else dw.contiguous(),
            _empty(e) if db is None else db.contiguous())


@_lle_bwd_op.register_fake
def _(hidden, weight, targets, bias, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index,
      needs_dhidden, needs_dweight, needs_dbias, backend):
    e = hidden.device
    return (torch.empty_like(hidden) if needs_dhidden else _empty(e),
            torch.empty_like(weight) if needs_dweight else _empty(e),
            torch.empty_like(bias) if (needs_dbias and bias is not None) else _empty(e))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, ignore_index, backend = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, targets, bias, lse, ent)
    ctx.temperature, ctx.ignore_index, ctx.backend = temperature, ignore_index, backend
    ctx.has_bias = bias is not None


def _backward(ctx, g_logp, g_ent, g_lse):
    hidden, weight, targets, bias, lse, ent = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if g_logp is None:
        g_logp = torch.zeros_like(lse)
    if g_ent is None:
        g_ent = torch.zeros_like(lse)
    dx, dw, db = _lle_bwd_op(hidden, weight, targets, bias, lse, ent, g_logp.contiguous(), g_ent.contiguous(),
                             ctx.temperature, ctx.ignore_index, bool(needs[0]), bool(needs[1]),
                             bool(ctx.has_bias and needs[3]), ctx.backend)
    return (dx if needs[0] else None, dw if needs[1] else None, None,
            db if (ctx.has_bias and needs[3]) else None, None, None, None)


_lle_op.register_autograd(_backward, setup_context=_setup_context)


def check_lle_inputs(hidden, weight, targets, bias, temperature=1.0):
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected [V, {hidden.shape[1]}], got shape {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets: expected shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets: expected int64, got {targets.dtype}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name}: expected fp16, bf16, fp32 or fp64, got {t.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature}")


def linear_logprob_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                           temperature: float = 1.0, return_entropy: bool = True, ignore_index: int = -100):
    """Log-prob of ``targets``, entropy and log-sum-exp of softmax((hidden @ weight.T + bias) / temperature).

    hidden [N, H], weight [V, H], targets [N] -> (logp f32[N], entropy f32[N] | None, lse f32[N]).
    Differentiable w.r.t. hidden, weight and bias through logp and entropy; never materializes the N x V
    logits. Rows with ``targets == ignore_index`` give zeros and no gradient. See docs/ops-math.md.
    """
    check_lle_inputs(hidden, weight, targets, bias, temperature)
    be = _backend.select(hidden.device, "linear_logprob_entropy", tuple(FORWARD))
    logp, ent, lse = _lle_op(hidden.contiguous(), weight.contiguous(), targets.long().contiguous(),
                             None if bias is None else bias.contiguous(), float(temperature), int(ignore_index), be)
    return logp, (ent if return_entropy else None), lse.detach()
