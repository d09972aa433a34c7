"""The marks of the Triton GPU test modules: ``pytestmark = TRITON_GPU`` (skipped without a CUDA device or
Triton, and under the Triton interpreter)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

TRITON_GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="GPU tests do not run in the interpreter"),
]
