"""Input checks shared by the public ops: every message names the argument."""

from __future__ import annotations

import torch


def out_dtype(*tensors) -> torch.dtype:
    """fp64 when every floating input is fp64 (oracle mode), else fp32."""
    ts = [t for t in tensors if t is not None and t.is_floating_point()]
    return torch.float64 if ts and all(t.dtype == torch.float64 for t in ts) else torch.float32


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {desc}")


def check_vector(name: str, t, n: int, *, floating: bool = True, optional: bool = True) -> None:
    if t is None:
        if not optional:
            raise ValueError(f"{name}: required")
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(t.shape)}")
    if floating and not (t.is_floating_point() or t.dtype == torch.bool):
        raise TypeError(f"{name}: expected a floating tensor, got {t.dtype}")
