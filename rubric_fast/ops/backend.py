"""Backend choice: ``torch`` (reference), ``cpu`` (C++), ``cuda`` (C++), ``triton``.

Each op has one table (backend -> implementation; absent means unsupported): ``FORWARD`` / ``BACKWARD`` in
ops/linear.py, ``POLICY_LOSS`` / ``FUSED`` in ops/policy.py, ``GROUP_ADVANTAGES`` / ``ENTROPY_MASK`` in
ops/small.py. The choice is automatic per device, the first of the op's table in this order that can run
here (CUDA tensors: triton, then cuda, then torch; CPU tensors: cpu, then torch), and can be forced with
``RUBRIC_FAST_BACKEND=torch|cpu|cuda|triton`` or :func:`use_backend`. Whenever the backend that would
run is not the op's preferred one (a native extension not built, triton missing, a forced backend the op
lacks) one log line says so: a fall-back to the reference is never silent.
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


@functools.cache
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


def _why_not(backend: str, device: torch.device) -> str:
    if backend == "triton":
        return "triton is not installed" if not _triton_importable() else f"triton does not run on {device.type}"
    if backend in ("cpu", "cuda"):
        return f"the native {backend.upper()} ops of rubric_fast._C are not available ({_native_status.reason()})"
    return "unavailable"


def select(device: torch.device, op: str, supported: tuple[str, ...] = BACKENDS) -> str:
    """The backend that runs ``op`` on ``device``: the forced one if it can, else the first of the op's
    ``supported`` backends, in this device's order, that can run here."""
    order = _ORDER.get(device.type, ("torch",)) + ("torch",)
    chosen = next(b for b in order if b in supported and _runs_on(b, device))
    if _forced is not None:
        if _forced in supported and _runs_on(_forced, device):
            return _forced
        key = (_forced, op, device.type)
        if key not in _warned:
            _warned.add(key)
            why = "has no such implementation" if _forced not in supported else _why_not(_forced, device)
            log.warning("rubric_fast: backend %r cannot run %s on %s (%s); using %r", _forced, op, device.type,
                        why, chosen)
        return chosen
    preferred = next(b for b in order if b in supported)
    if chosen != preferred:
        key = (preferred, op, device.type)
        if key not in _warned:
            _warned.add(key)
            log.warning("rubric_fast: %s on %s runs on %r: %s", op, device.type, chosen, _why_not(preferred, device))
    return chosen


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
