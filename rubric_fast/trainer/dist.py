"""Process-group facts from the torchrun environment, and the one place token counts are reduced.

Never assume a single process: every normalizer of the loss (token counts, sequence counts) goes through
:func:`global_sum`, which is the identity without an initialised process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


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


def init_distributed(backend: str = "auto") -> DistInfo:
    """Initialise the default process group when torchrun started several processes."""
    info = dist_info()
    if info.world_size > 1 and not is_distributed():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend=backend)
    return info


def sync_gradients(params: list[torch.Tensor]) -> None:
    """Sum gradients over ranks (the loss is already divided by the global token / sequence count)."""
    if not is_distributed():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch_dist.all_reduce(p.grad, op=torch_dist.ReduceOp.SUM)


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (a no-op in a single process)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            torch_dist.broadcast(t.data, src=0)
