"""Test-wide settings.

RUBRIC_FAST_POISON=1: every native (C++/CUDA) and Triton launcher fills its fresh output buffers with NaN
before writing them, so an element a kernel forgets to write fails the test instead of passing on stale
memory that happened to be right.
"""

import os

os.environ.setdefault("RUBRIC_FAST_POISON", "1")
