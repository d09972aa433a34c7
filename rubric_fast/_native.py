"""Loader of the native extension ``rubric_fast._C`` (C++ CPU ops, and CUDA ops when compiled in).

Importing ``rubric_fast._C`` registers the ``torch.ops.rubric_fast.*_native`` ops (see csrc/ops.cpp for
the schemas). A missing or unloadable extension is not an error: it is logged once on the
``rubric_fast`` logger and the flags below say what is there, so the op layer can fall back to the
torch / Triton backends.

CPU_AVAILABLE   the C++ CPU ops are registered
CUDA_AVAILABLE  the CUDA ops are compiled in and torch sees a CUDA device
load_error      why the extension is not there (None when it loaded)
"""

from __future__ import annotations

import logging

import torch

_log = logging.getLogger("rubric_fast")

CPU_AVAILABLE: bool = False
CUDA_COMPILED: bool = False
CUDA_AVAILABLE: bool = False
load_error: str | None = None

try:
    from rubric_fast import _C  # noqa: F401  (the import registers the ops)
except Exception as exc:  # ImportError, or an OSError/undefined symbol from a torch version mismatch
    _C = None
    load_error = f"{type(exc).__name__}: {exc}"
    _log.warning(
        "rubric_fast: native extension rubric_fast._C is not available (%s); the C++/CUDA backends are "
        "disabled and the ops use the torch/Triton backends. Rebuild with `pip install -e .`.",
        load_error,
    )
else:
    CPU_AVAILABLE = True
    CUDA_COMPILED = bool(getattr(_C, "WITH_CUDA", 0))
    CUDA_AVAILABLE = CUDA_COMPILED and torch.cuda.is_available()

__all__ = ["CPU_AVAILABLE", "CUDA_AVAILABLE", "CUDA_COMPILED", "load_error"]
