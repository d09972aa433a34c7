"""Backend choice: ``torch`` (reference), ``cpu`` (C++), ``cuda`` (C++), ``triton``.

The choice is automatic per device (CUDA tensors: triton, then cuda, then torch; CPU tensors: cpu, then
torch) and can be forced with ``RUBRIC_FAST_BACKEND=torch|cpu|cuda|triton`` or :func:`use_backend`.
A backend that cannot run an op on the given device falls back to the next one with one log line.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os

import torch

from .. import _native_status

_native_status._load()  # resolve the extension once, before any compiled region reads it

log = logging.getLogger("rubric_fast")

BACKENDS = ("torch", "cpu", "cuda", "triton")
_forced: str | None = None


def _parse(name: str | None, source: str) -> str | None:
    if name in (None, "", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{source}: got {name!r}; accepted: auto, {', '.join(BACKENDS)}")
    return name


_forced = _parse(os.environ.get("RUBRIC_FAST_BACKEND"), "RUBRIC_FAST_BACKEND")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends() -> list[str]:
    """Backends usable in this process (on at least one device)."""
    out = ["torch"]
    if _native_status.cpu_available():
        out.append("cpu")
    if _native_status.cuda_available():
        out.append("cuda")
    if _triton_importable() and (torch.cuda.is_available() or triton_interpreted()):
        out.append("triton")
    return out


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "cpu":
        return device.type == "cpu" and _native_status.cpu_available()
    if backend == "cuda":
        return device.type == "cuda" and _native_status.cuda_available()
    # triton: real GPU kernels on CUDA tensors, or the interpreter on CPU tensors
    return _triton_importable() and (device.type == "cuda" or (device.type == "cpu" and triton_interpreted()))


_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
_warned: set[tuple[str, str, str]] = set()


def select(device: torch.device, op: str, supported: tuple[str, ...] = BACKENDS) -> str:
    """The backend that runs ``op`` on ``device``: the forced one if it can, else the first that can."""
    order = _ORDER.get(device.type, ("torch",))
    if _forced is not None:
        if _forced in supported and _runs_on(_forced, device):
            return _forced
        chosen = next(b for b in order + ("torch",) if b in supported and _runs_on(b, device))
        key = (_forced, op, device.type)
        if key not in _warned:
            _warned.add(key)
            log.warning("rubric_fast: backend %r cannot run %s on %s; using %r", _forced, op, device.type, chosen)
        return chosen
    return next(b for b in order + ("torch",) if b in supported and _runs_on(b, device))


def current_backend() -> str | None:
    """The forced backend, or None for automatic choice."""
    return _forced


def use_backend(name: str | None):
    """Force a backend (``None`` or ``"auto"``: automatic). Usable as a plain call or a context manager."""
    global _forced
    previous = _forced
    _forced = _parse(name, "use_backend(name)")

    @contextlib.contextmanager
    def _restore():
        global _forced
        try:
            yield
        finally:
            _forced = previous

    return _restore()
