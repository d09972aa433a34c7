"""Triton kernels and their plain launchers (tensors in, tensors out). Imported as rubric_fast.kernels."""
