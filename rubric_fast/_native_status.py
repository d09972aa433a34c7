"""Whether the compiled extension ``rubric_fast._C`` is loaded (see rubric_fast/_native.py).

Kept apart so the ops layer works (on the ``torch`` backend) while the extension is missing. The answer is
computed once, on first use, and kept in plain module globals (``torch.compile`` reads them as constants).
"""

from __future__ import annotations

_state: tuple[bool, bool] | None = None


def _load() -> tuple[bool, bool]:
    global _state
    if _state is None:
        try:
            from . import _native
        except ImportError:  # the loader itself is missing: treat as no extension
            _state = (False, False)
        else:
            _state = (bool(getattr(_native, "CPU_AVAILABLE", False)), bool(getattr(_native, "CUDA_AVAILABLE", False)))
    return _state


def cpu_available() -> bool:
    return _load()[0]


def cuda_available() -> bool:
    return _load()[1]


def reason() -> str:
    """Why a native backend is missing, in a few words (for the one log line of the op dispatch)."""
    try:
        from . import _native
    except ImportError:
        return "no loader"
    if _native.load_error:
        return f"extension not loaded: {_native.load_error}"
    if not _native.CUDA_COMPILED:
        return "built without CUDA"
    return "no CUDA device"
