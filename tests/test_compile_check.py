"""`rubric-fast compile-check`: every Triton variant the launchers would launch compiles for real GPUs.

The Triton interpreter of the CPU tests accepts code that a GPU compile rejects (a plain global read inside
a kernel, for one), so this compiles ahead of time for sm_90 and sm_80 from a fresh Triton cache, without
a GPU, and fails on a compile error, a 16-bit GEMM without wgmma on sm_90, a register spill in a GEMM
kernel, or shared memory over the limit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HAVE_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def test_every_variant_compiles_for_sm90_and_sm80(tmp_path):
    out = tmp_path / "cc.json"
    proc = subprocess.run([sys.executable, "-m", "rubric_fast.cli", "compile-check", "--arch", "90", "--arch", "80",
                           "--json", str(out)], env=_env(), capture_output=True, text=True, timeout=1200)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    rows = json.loads(out.read_text())
    kernels = {r["kernel"] for r in rows}
    assert {"_fwd_tile_kernel", "_combine_kernel", "_dlogits_kernel", "_mm_accumulate_kernel",
            "_policy_loss_kernel"} <= kernels
    gemm90 = [r for r in rows if r["gemm"] and r["arch"] == 90 and "float32" not in r["variant"]]
    gemm80 = [r for r in rows if r["gemm"] and r["arch"] == 80 and "float32" not in r["variant"]]
    assert gemm90 and all(r["mma"] == "wgmma" for r in gemm90)
    assert gemm80 and all(r["mma"] == "mma.sync" for r in gemm80)
    assert all(r["compiled"] and r["spill_bytes"] == 0 for r in rows if r["gemm"])
    assert all(0 <= r["shared_bytes"] <= 232448 for r in rows)
    # both benchmark shapes, three dtypes, bias or not, frozen head and token-sparse paths are in the list
    variants = " ".join(r["variant"] for r in rows)
    for part in ("bfloat16", "float16", "float32", "bias=1", "fused", "recompute", "forward"):
        assert part in variants


def test_a_kernel_the_interpreter_accepts_but_a_gpu_rejects_is_reported(tmp_path, monkeypatch):
    """A plain Python global read inside a kernel runs in the interpreter and fails a GPU compile: the
    check must report it as a failed row (this is how the forward kernels used to be broken)."""
    src = tmp_path / "bad_kernel_mod.py"
    src.write_text(
        "import triton\nimport triton.language as tl\nNEG = -1.0e30\n\n"
        "@triton.jit\ndef bad(x_ptr, N, BLOCK: tl.constexpr):\n"
        "    offs = tl.arange(0, BLOCK)\n    tl.store(x_ptr + offs, tl.full((BLOCK,), NEG, tl.float32), mask=offs < N)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import torch
    from rubric_fast.kernels.plan import KernelLaunch

    from rubric_fast import compile_check

    mod = __import__("bad_kernel_mod")
    spec = KernelLaunch("bad", "policy_loss", dict(BLOCK=128), 4, 1, (1,))
    with pytest.raises(Exception, match="global"):
        compile_check.compile_one(spec, (torch.empty(4), 100), 90, fn=mod.bad)


def test_bad_shape_argument_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "rubric_fast.cli", "compile-check", "--shape", "1,2"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--shape: expected N,H,V" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_odd_and_tiny_shapes_compile_without_spills(tmp_path):
    """Rows that are not 16-byte aligned (H = 24, 2050; V = 130, 131101), a single row, a one-tile
    vocabulary (a count of 1 is specialized into a constexpr by Triton) and N x V > 2^31."""
    cmd = [sys.executable, "-m", "rubric_fast.cli", "compile-check", "--arch", "90", "--arch", "80",
           "--dtype", "bfloat16", "--shape", "1,16,37", "--shape", "33,24,130", "--shape", "1,64,1",
           "--shape", "16391,2050,131101"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
