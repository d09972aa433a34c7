"""Launcher helpers shared by the Triton op families (no kernels here)."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU interpreter): small tiles, no GPU-only launch options."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def poisoning() -> bool:
    """RUBRIC_FAST_POISON=1 makes every launcher fill its fresh output buffers with NaN before the launch,
    so that a kernel that forgets to write an element is caught by the tests."""
    return os.environ.get("RUBRIC_FAST_POISON", "0") == "1"


def new_empty(shape, dtype, device) -> torch.Tensor:
    """torch.empty that is NaN-poisoned (floats) or filled with a sentinel (ints) under RUBRIC_FAST_POISON=1."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if poisoning():
        t.fill_(float("nan") if t.is_floating_point() else -123456789)
    return t


def f32(x) -> float:
    """Python floats become fp32 kernel arguments (under torch.compile they otherwise arrive as fp64)."""
    return float(torch.tensor(float(x), dtype=torch.float32).item())
