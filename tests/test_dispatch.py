"""Backend dispatch: one table per op; what runs on CUDA tensors, decided on a CPU machine with the
device's availability mocked. A fall-back to the reference is never silent."""

from __future__ import annotations

import logging

import pytest
import torch

from rubric_fast import _native_status
from rubric_fast.ops import backend
from rubric_fast.ops.linear import BACKWARD, FORWARD
from rubric_fast.ops.policy import FUSED, POLICY_LOSS
from rubric_fast.ops.small import ENTROPY_MASK, GROUP_ADVANTAGES

TABLES = {"linear_logprob_entropy": FORWARD, "linear_logprob_entropy_backward": BACKWARD,
          "policy_loss": POLICY_LOSS, "fused_linear_policy_loss": FUSED, "group_advantages": GROUP_ADVANTAGES,
          "entropy_mask": ENTROPY_MASK}
CUDA = torch.device("cuda")


@pytest.fixture
def gpu_machine(monkeypatch):
    """Pretend: a CUDA device, the CUDA C++ ops compiled in, triton installed."""
    state = {"cuda": True, "triton": True}
    monkeypatch.setattr(_native_status, "cuda_available", lambda: state["cuda"])
    monkeypatch.setattr(_native_status, "cpu_available", lambda: True)
    monkeypatch.setattr(backend, "_triton_importable", lambda: state["triton"])
    monkeypatch.setattr(backend, "_forced", None)
    monkeypatch.setattr(backend, "_warned", set())
    return state


def test_every_table_names_known_backends_and_callables():
    for op, table in TABLES.items():
        assert set(table) <= set(backend.BACKENDS), op
        assert "torch" in table, f"{op}: the reference must be there"
        assert all(callable(f) for f in table.values()), op


def test_cuda_tensors_run_the_cuda_small_ops(gpu_machine):
    # no Triton group_advantages / entropy_mask: the CUDA C++ ops, not the reference
    assert backend.select(CUDA, "group_advantages", tuple(GROUP_ADVANTAGES)) == "cuda"
    assert backend.select(CUDA, "entropy_mask", tuple(ENTROPY_MASK)) == "cuda"
    # the hot path prefers triton, then the CUDA C++ ops
    assert backend.select(CUDA, "policy_loss", tuple(POLICY_LOSS)) == "triton"
    assert backend.select(CUDA, "fused_linear_policy_loss", tuple(FUSED)) == "triton"
    gpu_machine["triton"] = False
    assert backend.select(CUDA, "policy_loss", tuple(POLICY_LOSS)) == "cuda"
    # CPU tensors on the same machine: the C++ CPU ops
    assert backend.select(torch.device("cpu"), "group_advantages", tuple(GROUP_ADVANTAGES)) == "cpu"


def test_missing_native_cuda_is_logged_not_silent(gpu_machine, caplog):
    gpu_machine["cuda"] = False
    with caplog.at_level(logging.WARNING, logger="rubric_fast"):
        assert backend.select(CUDA, "group_advantages", tuple(GROUP_ADVANTAGES)) == "torch"
        assert backend.select(CUDA, "group_advantages", tuple(GROUP_ADVANTAGES)) == "torch"
    lines = [r.getMessage() for r in caplog.records if "group_advantages" in r.getMessage()]
    assert len(lines) == 1 and "'torch'" in lines[0] and "CUDA" in lines[0]


def test_forced_backend_without_the_op_is_logged(gpu_machine, caplog, monkeypatch):
    monkeypatch.setattr(backend, "_forced", "triton")
    with caplog.at_level(logging.WARNING, logger="rubric_fast"):
        assert backend.select(CUDA, "entropy_mask", tuple(ENTROPY_MASK)) == "cuda"
    assert any("has no such implementation" in r.getMessage() for r in caplog.records)
