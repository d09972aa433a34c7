"""kernels/plan.py: the schedule, row blocks and memory of the fused loss, as pure functions (no GPU)."""

from __future__ import annotations

import pytest
import torch
from rubric_fast.kernels import plan
from rubric_fast.kernels.fused_linear_policy_loss import choose_schedule

from rubric_fast.bench_plan import plans_for, show
from rubric_fast.reference.types import PolicyLossConfig

SHAPES = [(16384, 2048, 151936), (8192, 4096, 128256)]


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    for k in ("RUBRIC_FAST_WORKSPACE_MB", "RUBRIC_FAST_EXTRA_MB", "RUBRIC_FAST_DW_ACCUM", "TRITON_INTERPRET"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("n,h,v", SHAPES)
def test_benchmark_shapes_meet_the_arithmetic_and_memory_targets(n, h, v):
    full, top, fwd = (p for _, p in plans_for(n, h, v, dtype=torch.bfloat16, arch=90))
    assert full.schedule == "fused"
    assert full.gemm_equivalents == pytest.approx(3.0) and full.x_floor == pytest.approx(1.0)
    assert full.peak_extra_bytes <= 1.5e9
    # what the plan counts covers the gradients themselves
    assert full.peak_extra_bytes >= n * h * 2 + v * h * 2 + full.blocks.workspace_bytes
    assert full.blocks.n_blocks * full.blocks.rows_per_block >= n
    assert full.blocks.rows_per_block % full.tile.BLOCK_N == 0
    assert top.x_floor <= 0.7 and top.peak_extra_bytes <= 1.5e9
    assert fwd.gemm_equivalents == pytest.approx(1.0)
    text = show([(n, h, v)])
    assert "3.00 GEMM-equivalents" in text and "1.00x the floor" in text


def test_schedule_choice():
    assert choose_schedule(PolicyLossConfig(), entropy_mask_given=False, needs_grad=True) == "fused"
    assert choose_schedule(PolicyLossConfig(aggregation="seq_mean_token_mean"), entropy_mask_given=False,
                           needs_grad=True) == "fused"
    assert choose_schedule(PolicyLossConfig(loss="gspo"), entropy_mask_given=False, needs_grad=True) == "recompute"
    top = PolicyLossConfig(top_entropy_fraction=0.2)
    assert choose_schedule(top, entropy_mask_given=False, needs_grad=True) == "recompute"
    assert choose_schedule(top, entropy_mask_given=True, needs_grad=True) == "fused"
    assert choose_schedule(PolicyLossConfig(), entropy_mask_given=False, needs_grad=True,
                           requested="recompute") == "recompute"
    # fused is refused where it would be wrong, not honoured
    assert choose_schedule(PolicyLossConfig(loss="gspo"), entropy_mask_given=False, needs_grad=True,
                           requested="fused") == "recompute"
    with pytest.raises(ValueError, match="schedule"):
        choose_schedule(PolicyLossConfig(), entropy_mask_given=False, needs_grad=True, requested="one_pass")


def test_budget_and_dw_accumulation(monkeypatch):
    tile = plan.tile_config(torch.bfloat16, 90)
    # small problem: one block, dW is one GEMM
    b = plan.plan_blocks(1000, 64, 5000, dtype=torch.bfloat16, tile=tile, needs_dweight=True, fixed_bytes=0)
    assert b.n_blocks == 1 and b.dw_accum == "single"
    # a workspace cap forces blocks; dW then accumulates in fp32 where that leaves big enough blocks
    monkeypatch.setenv("RUBRIC_FAST_WORKSPACE_MB", str(4096 * 5000 * 4 / 2 ** 20))
    b = plan.plan_blocks(10000, 64, 5000, dtype=torch.bfloat16, tile=tile, needs_dweight=True, fixed_bytes=0)
    assert b.n_blocks == 3 and b.dw_accum == "fp32" and b.rows_per_block == 4096
    monkeypatch.setenv("RUBRIC_FAST_DW_ACCUM", "weight")
    b = plan.plan_blocks(10000, 64, 5000, dtype=torch.bfloat16, tile=tile, needs_dweight=True, fixed_bytes=0)
    assert b.dw_accum == "weight"
    # a frozen head never accumulates dW
    b = plan.plan_blocks(10000, 64, 5000, dtype=torch.bfloat16, tile=tile, needs_dweight=False, fixed_bytes=0)
    assert b.dw_accum == "single"
    # a smaller total budget gives smaller blocks
    monkeypatch.delenv("RUBRIC_FAST_WORKSPACE_MB")
    monkeypatch.delenv("RUBRIC_FAST_DW_ACCUM")
    big = plan.plan_fused(16384, 2048, 151936, dtype=torch.bfloat16, arch=90)
    monkeypatch.setenv("RUBRIC_FAST_EXTRA_MB", "1000")
    small = plan.plan_fused(16384, 2048, 151936, dtype=torch.bfloat16, arch=90)
    assert small.blocks.rows_per_block < big.blocks.rows_per_block
    assert small.peak_extra_bytes < big.peak_extra_bytes


def test_tiles_per_arch_and_dtype():
    t90 = plan.tile_config(torch.bfloat16, 90)
    t80 = plan.tile_config(torch.bfloat16, 80)
    for t, arch in ((t90, 90), (t80, 80)):
        smem = t.num_stages * (t.BLOCK_N + t.BLOCK_V) * t.BLOCK_H * 2
        assert smem <= plan.shared_limit(arch)
    assert plan.dot_precision(torch.float32) == "ieee"  # torch's default fp32 matmul precision is exact
    assert plan.tile_config(torch.float32, 90, interpret=True) == plan.INTERPRETER_TILE


def test_bench_plan_command_needs_no_gpu(capsys):
    from rubric_fast.bench_command import main

    assert main(["--plan", "default"]) == 0
    out = capsys.readouterr().out
    assert out.count("3.00 GEMM-equivalents") == 2  # both benchmark shapes, fused schedule
    assert "N=16384 H=2048 V=151936" in out and "N=8192 H=4096 V=128256" in out
    assert main(["--plan", "4096,1,2"]) == 0  # any shape, even a silly one
    assert main(["--plan", "1,2"]) == 2
    assert "--plan: expected N,H,V" in capsys.readouterr().err


def test_bench_on_a_missing_device_is_one_line(capsys):
    from rubric_fast.bench_command import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the CPU-only case is what is tested
    assert main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda: no CUDA device here" in err
    assert main(["--device", "tpu"]) == 2
    assert "--device: got 'tpu'" in capsys.readouterr().err


def test_a_head_bigger_than_the_budget_keeps_efficient_blocks():
    # H 8192 x V 152064 bf16: dW alone is 2.5 GB, over the 1.5 GB budget; blocks stay >= 512 rows
    p = plan.plan_fused(8192, 8192, 152064, dtype=torch.bfloat16, arch=90)
    assert p.blocks.rows_per_block >= 512
    assert p.gemm_equivalents == pytest.approx(3.0)
