"""Data parallel training from the torchrun environment: process group, gradient sync, FSDP2 sharding.

Rank, local rank and world size come from ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` (torchrun). Never assume
a single process: every normalizer of the loss (token counts, sequence counts) goes through
:func:`global_sum`, which is the identity without an initialised process group.

Two strategies (``distributed.strategy``):

``ddp``    every rank holds the whole model; gradients are summed over ranks once per optimizer step by
           :func:`sync_gradients` (flattened into buckets of ``distributed.bucket_mb``, one ``all_reduce``
           per bucket). Not ``torch.nn.parallel.DistributedDataParallel``: DDP reduces at every backward and
           needs the same number of backwards on every rank, while here a rank's micro-batch count depends on
           its completions' lengths and some ranks may have nothing to train on (all groups without signal).
           Summing once per optimizer step is exact for any split because the loss is divided by the
           *global* token / sequence count.
``fsdp2``  ``torch.distributed.fsdp.fully_shard`` on every decoder layer and on :class:`PolicyForward`
           (the root: embeddings, final norm, LM head), with a ``MixedPrecisionPolicy``. The loss needs the
           head's weight next to the hidden states (no logits), so :class:`PolicyForward`'s forward returns
           both: inside the root's forward the weight is the unsharded parameter, and its gradient is
           reduce-scattered into the shards by FSDP's post-backward. Gradients are summed
           (``set_gradient_divide_factor(1)``), again because the normalizer is global. Every FSDP forward is
           a collective, so the loop gives every rank the same number of forwards (padding micro-batches)
           and generation runs with ``synced_gpus``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist
from torch import nn

from rubric_fast.trainer.lm_head import get_decoder, hidden_states_and_head

from .models import DTYPES


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank, local rank and world size from ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` (torchrun)."""
    return DistInfo(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                    world_size=int(os.environ.get("WORLD_SIZE", "1")))


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def global_sum(value: float | torch.Tensor, device: torch.device | str = "cpu") -> float:
    """Sum of ``value`` over all ranks (the identity in a single process)."""
    if not is_distributed():
        return float(value)
    t = torch.as_tensor(float(value), dtype=torch.float64, device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return float(t.item())


def global_max(value: int, device: torch.device | str = "cpu") -> int:
    """Maximum of ``value`` over all ranks (the identity in a single process)."""
    if not is_distributed():
        return int(value)
    t = torch.tensor(int(value), dtype=torch.long, device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group when torchrun started several processes.

    ``timeout_s`` bounds every collective (gloo and NCCL honour it; for NCCL the watchdog aborts the
    communicator), so a rank that died or hangs ends the run with an error instead of a hang.
    """
    info = dist_info()
    if info.world_size > 1 and not is_distributed():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return info


def destroy_distributed() -> None:
    if is_distributed():
        torch_dist.destroy_process_group()


def sync_gradients(params: list[torch.Tensor], bucket_mb: float = 25.0) -> None:
    """Sum gradients over ranks (the loss is already divided by the global token / sequence count).

    Gradients are copied into flat buckets of at most ``bucket_mb`` MiB (one dtype and device each), one
    ``all_reduce`` per bucket, and copied back: a few large messages instead of one per parameter.
    """
    if not is_distributed():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    limit = max(1, int(bucket_mb * 2**20))
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    for p in params:
        g = p.grad
        nbytes = g.numel() * g.element_size()
        if bucket and (size + nbytes > limit or g.dtype != bucket[0].dtype or g.device != bucket[0].device):
            flush()
            bucket, size = [], 0
        bucket.append(g)
        size += nbytes
    flush()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (a no-op in a single process)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            torch_dist.broadcast(t.data, src=0)


class PolicyForward(nn.Module):
    """The module that data-parallel wrappers see: the loss's forward and generation, both as ``forward``.

    ``forward(input_ids, attention_mask, position_ids, rows, cols)`` returns the decoder's last hidden
    states at the completion positions ([N, H]), the LM head's weight and bias: no logits. With
    ``generate={...}`` it runs ``policy.generate(input_ids, attention_mask, **generate)`` instead. Going
    through one root ``forward`` is what lets FSDP2 gather the root's parameters (embeddings, final norm,
    head) around both uses.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids, attention_mask, position_ids=None, rows=None, cols=None, generate=None):
        if generate is not None:
            return self.policy.generate(input_ids=input_ids, attention_mask=attention_mask, **generate)
        hidden, weight, bias = hidden_states_and_head(self.policy, input_ids, attention_mask,
                                                      position_ids=position_ids)
        return hidden[rows, cols], weight, bias


def decoder_layers(policy: nn.Module) -> list[nn.Module]:
    """The transformer blocks (``decoder.layers`` / ``decoder.h``) that FSDP2 shards one by one."""
    decoder = get_decoder(policy)
    for attr in ("layers", "h", "blocks"):
        layers = getattr(decoder, attr, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return list(layers)
    raise ValueError(f"distributed.strategy=fsdp2: cannot find the decoder layers of {type(decoder).__name__} "
                     "(expected a ModuleList named layers, h or blocks)")


def shard_fsdp2(root: PolicyForward, *, param_dtype: str | None, reduce_dtype: str | None,
                reshard_after_forward: bool = True) -> PolicyForward:
    """``fully_shard`` every decoder layer, then the root; gradients summed, not averaged, over ranks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype] if param_dtype else None,
                              reduce_dtype=DTYPES[reduce_dtype] if reduce_dtype else None)
    for layer in decoder_layers(root.policy):
        fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mp_policy=mp)
    for m in root.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)  # the loss is divided by the global count already
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return root


def full_tensor(t):
    """A plain tensor from a DTensor (the total grad norm of sharded gradients), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def sharded_state(model: nn.Module, optimizer) -> dict:
    """Model and optimizer state as DTensor shards (torch.distributed.checkpoint's input and output)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def set_sharded_state(model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
