"""What the Triton launchers will launch, as pure functions of (shape, dtype, architecture).

Nothing here touches a GPU: the launchers ask these functions for their tile configurations, row blocks and
grids, ``rubric-fast compile-check`` compiles exactly those variants ahead of time (no GPU needed), and
``rubric-fast bench --plan N,H,V`` prints the schedule, its GEMM FLOPs as a multiple of the three-GEMM
floor, the workspace, the peak extra memory and an estimate of the HBM traffic.

Schedules of the fused policy loss (docs/ops-math.md, "Schedules"):

* ``fused``: the active rows (rows that get a gradient) go through row blocks of R rows. For a block, one
  Triton GEMM writes the fp32 logits into a bounded workspace while it reduces per-tile (max, sum-exp,
  entropy sum, target logit); a combine gives lse / entropy / log-prob; the policy-loss kernel gives each
  row's coefficients; a memory-bound kernel turns the stored logits into dlogits in place; two cuBLAS GEMMs
  give the block's dX (complete: its rows see the whole vocabulary) and its share of dW. Three
  GEMM-equivalents over the active rows, plus one forward GEMM over rows that only need their log-probs.
  Works whenever each token's coefficient depends on its own row only (every loss but GSPO, every
  aggregation, a given entropy mask).
* ``recompute``: a forward over every row (one GEMM, no logits stored), then the coefficients (GSPO's
  sequence ratio, a top-entropy selection), then the same row-block pass over the active rows with the
  coefficients known: 1 + 3 x (active fraction) GEMM-equivalents. Also the backward of
  ``linear_logprob_entropy`` and the frozen-head case (no dW: two GEMMs per block).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from ._common import interpreting

# ------------------------------------------------------------------------------------------------------
# tile configurations

SM_SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


@dataclass(frozen=True)
class TileConfig:
    """Constexprs and launch options of the logits GEMM (forward tiles, stored logits)."""

    BLOCK_N: int
    BLOCK_V: int
    BLOCK_H: int
    GROUP_N: int
    num_warps: int
    num_stages: int

    def constexprs(self) -> dict:
        return dict(BLOCK_N=self.BLOCK_N, BLOCK_V=self.BLOCK_V, BLOCK_H=self.BLOCK_H, GROUP_N=self.GROUP_N)

    def options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


INTERPRETER_TILE = TileConfig(16, 32, 16, 2, 1, 1)


def elem_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision setting (``highest``: exact fp32 FMA, no tensor cores)."""
    if dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32"  # ignored for 16-bit inputs


# Autotuning (RUBRIC_FAST_AUTOTUNE=1 on a GPU): the forward tile is chosen among these by timing, once per
# (dtype, arch, H, V), and remembered (kernels/autotune.py). Every candidate is compile-checked.
TILE_CANDIDATES_16BIT = (TileConfig(128, 128, 64, 16, 8, 4), TileConfig(128, 128, 64, 8, 8, 3),
                         TileConfig(128, 64, 64, 16, 4, 4), TileConfig(128, 128, 32, 16, 8, 5))
_TUNED: dict[tuple, TileConfig] = {}


def tune_key(dtype: torch.dtype, arch: int | None, h: int | None, v: int | None) -> tuple:
    return (str(dtype).replace("torch.", ""), arch, h, v)


def tile_candidates(dtype: torch.dtype, arch: int | None, *, h: int, v: int) -> list[TileConfig]:
    """The tiles autotuning may choose from for this shape (the default first)."""
    default = default_tile(dtype, arch, h=h, v=v)
    if interpreting() or dtype == torch.float32 or arch is None or arch < 80 or h % 16 or v % 16:
        return [default]
    return [default] + [t for t in TILE_CANDIDATES_16BIT if t != default]


def set_tuned(dtype: torch.dtype, arch: int | None, h: int, v: int, tile: TileConfig) -> None:
    _TUNED[tune_key(dtype, arch, h, v)] = tile


def tile_config(dtype: torch.dtype, arch: int | None, interpret: bool | None = None, *, h: int | None = None,
                v: int | None = None) -> TileConfig:
    """The tile the launchers use: an autotuned one for this (dtype, arch, H, V) if there is one, else the
    default (:func:`default_tile`)."""
    tuned = _TUNED.get(tune_key(dtype, arch, h, v))
    if tuned is not None and not (interpreting() if interpret is None else interpret):
        return tuned
    return default_tile(dtype, arch, interpret, h=h, v=v)


def default_tile(dtype: torch.dtype, arch: int | None, interpret: bool | None = None, *, h: int | None = None,
                 v: int | None = None) -> TileConfig:
    """The logits-GEMM tile for this dtype and compute capability (e.g. 90 for H100 / H200).

    16-bit inputs on Hopper: 128 x 128 tiles over two warpgroups (wgmma m64n128), 4 stages of 128x64 + 128x64
    bf16 in shared memory (128 KiB), 16 row blocks sweep the vocabulary together so that a wave of programs
    shares its W tiles and its X rows through L2. 128 x 256 tiles spill registers in the softmax epilogue
    (``rubric-fast compile-check`` reports it), so they are not used. Ampere: the same tile, mma.sync, 3
    stages (96 KiB). Rows whose length (H, or V for the stored logits) is not a multiple of 16 elements
    cannot be loaded / stored with 16-byte vectors and spill at 128 x 128: those shapes take 128 x 64 x 32.
    fp32 (exact FMA): smaller tiles."""
    if interpreting() if interpret is None else interpret:
        return INTERPRETER_TILE
    if dtype == torch.float32:
        if dot_precision(dtype) == "tf32" and arch is not None and arch >= 80:
            return TileConfig(128, 128, 32, 16, 8, 3)
        return TileConfig(64, 128, 32, 16, 8, 2)
    if (h is not None and h % 16) or (v is not None and v % 16):
        return TileConfig(128, 64, 32, 16, 8, 3)
    if arch is not None and arch >= 90:
        return TileConfig(128, 128, 64, 16, 8, 4)
    return TileConfig(128, 128, 64, 16, 8, 3)


def rowwise_config(interpret: bool | None = None) -> dict:
    """Rows per program and columns per step of the memory-bound kernels (combine, dlogits)."""
    if interpreting() if interpret is None else interpret:
        return dict(ROWS=2, BLOCK_V=64, COMBINE_BLOCK=32, num_warps=1)
    return dict(ROWS=4, BLOCK_V=1024, COMBINE_BLOCK=128, num_warps=8)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def forward_grid(n: int, v: int, tile: TileConfig) -> tuple[int]:
    return (cdiv(n, tile.BLOCK_N) * cdiv(v, tile.BLOCK_V),)


def device_arch(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


# ------------------------------------------------------------------------------------------------------
# memory budget and row blocks

DEFAULT_EXTRA_BUDGET = int(1.5e9)  # bytes of extra memory a fused call may use, gradients included
MIN_WORKSPACE = 64 << 20
MIN_BLOCK_ROWS = 512  # below this the dW GEMM of a block (K = rows) is memory-bound: over-budget beats 10x slower


def extra_budget() -> int:
    """RUBRIC_FAST_EXTRA_MB: extra memory of one fused call, dX and dW included (default 1.5 GB)."""
    v = os.environ.get("RUBRIC_FAST_EXTRA_MB")
    return int(float(v) * (1 << 20)) if v else DEFAULT_EXTRA_BUDGET


def workspace_cap() -> int | None:
    """RUBRIC_FAST_WORKSPACE_MB: a hard cap on the logits workspace (default: what the budget leaves)."""
    v = os.environ.get("RUBRIC_FAST_WORKSPACE_MB")
    return int(float(v) * (1 << 20)) if v else None


@dataclass(frozen=True)
class BlockPlan:
    rows_per_block: int
    n_blocks: int
    workspace_bytes: int     # fp32 logits of one block (dlogits written in place)
    partial_bytes: int       # per-tile statistics of one block
    dw_accum: str            # "single" (one GEMM), "weight" (addmm in the weight dtype), "fp32" (fp32 buffer)


def _block_rows(ws_bytes: int, v: int, block_n: int, n_rows: int) -> int:
    r = max(1, ws_bytes // (v * 4))
    if r >= block_n:
        r = (r // block_n) * block_n
    return max(1, min(r, n_rows))


def plan_blocks(n_active: int, h: int, v: int, *, dtype: torch.dtype, tile: TileConfig, needs_dweight: bool,
                fixed_bytes: int) -> BlockPlan:
    """Row blocks for ``n_active`` rows: the largest block the budget allows after ``fixed_bytes`` (the
    gradients and per-row vectors); dW accumulates in fp32 only when that still leaves blocks of at least
    1024 rows (below that the fp32 read-modify-write of dW per block costs more than it is worth)."""
    n_active = max(n_active, 1)
    per_row = v * 4 + cdiv(v, tile.BLOCK_V) * 16 + 2 * h * elem_size(dtype)
    cap = workspace_cap()
    # when the gradients alone fill the budget (a big head), blocks keep MIN_BLOCK_ROWS rows: the budget is a
    # target, and tiny blocks would make every dW GEMM memory-bound
    floor_room = max(MIN_WORKSPACE, min(n_active, MIN_BLOCK_ROWS) * per_row)
    room = max(floor_room, extra_budget() - fixed_bytes)

    def rows_for(room_bytes):
        ws = room_bytes * (v * 4) // per_row
        if cap is not None:
            ws = min(ws, cap)
        return _block_rows(ws, v, tile.BLOCK_N, n_active)

    r = rows_for(room)
    n_blocks = cdiv(n_active, r)
    mode = "single" if n_blocks == 1 or not needs_dweight else "weight"
    if mode == "weight" and dtype != torch.float32 and os.environ.get("RUBRIC_FAST_DW_ACCUM", "auto") != "weight":
        dw32 = v * h * 4
        r32 = rows_for(max(floor_room, extra_budget() - fixed_bytes - dw32))
        forced = os.environ.get("RUBRIC_FAST_DW_ACCUM") == "fp32"
        if forced or (extra_budget() - fixed_bytes - dw32 > 0 and r32 >= min(n_active, 1024)):
            r, n_blocks, mode = r32, cdiv(n_active, r32), ("single" if cdiv(n_active, r32) == 1 else "fp32")
    return BlockPlan(rows_per_block=r, n_blocks=n_blocks, workspace_bytes=r * v * 4,
                     partial_bytes=4 * cdiv(v, tile.BLOCK_V) * r * 4, dw_accum=mode)


# ------------------------------------------------------------------------------------------------------
# the whole call


@dataclass(frozen=True)
class KernelLaunch:
    """One Triton kernel variant as a launcher will launch it: what compile-check compiles."""

    kernel: str                     # attribute name in its module
    module: str                     # "linear_logprob_entropy" | "policy_loss"
    constexprs: dict
    num_warps: int
    num_stages: int
    grid: tuple
    gemm: bool = False              # a tl.dot kernel (must use tensor cores for 16-bit inputs)


@dataclass(frozen=True)
class FusedPlan:
    schedule: str                   # "fused" | "recompute" | "forward"
    n: int
    h: int
    v: int
    n_active: int
    dtype: str
    arch: int | None
    tile: TileConfig
    blocks: BlockPlan | None
    gemm_flops: float
    floor_flops: float
    peak_extra_bytes: int
    hbm_bytes: float                # all traffic, GEMM operands included
    rowwise_bytes: float = 0.0      # traffic of the memory-bound kernels (dlogits, combine): not hidden by GEMMs
    launches: list[KernelLaunch] = field(default_factory=list)

    @property
    def gemm_equivalents(self) -> float:
        return self.gemm_flops / (2.0 * self.n * self.h * self.v) if self.n else 0.0

    @property
    def x_floor(self) -> float:
        return self.gemm_flops / self.floor_flops if self.floor_flops else 0.0


def forward_launches(n: int, h: int, v: int, dtype: torch.dtype, arch: int | None, *, has_bias: bool,
                     store_z: bool, stats: bool = True) -> list[KernelLaunch]:
    tile = tile_config(dtype, arch, h=h, v=v)
    rw = rowwise_config()
    out = [KernelLaunch("_fwd_tile_kernel", "linear_logprob_entropy",
                        dict(HAS_BIAS=has_bias, STORE_Z=store_z, STATS=stats, DOT_PRECISION=dot_precision(dtype),
                             **tile.constexprs()),
                        tile.num_warps, tile.num_stages, forward_grid(n, v, tile), gemm=True)]
    if stats:
        out.append(KernelLaunch("_combine_kernel", "linear_logprob_entropy", dict(BLOCK=rw["COMBINE_BLOCK"]),
                                4, 1, (cdiv(n, rw["COMBINE_BLOCK"]),)))
    return out


def dlogits_launch(rows: int, *, in_place: bool, has_dbias: bool) -> KernelLaunch:
    rw = rowwise_config()
    return KernelLaunch("_dlogits_kernel", "linear_logprob_entropy",
                        dict(HAS_DBIAS=has_dbias, IN_PLACE=in_place, ROWS=rw["ROWS"], BLOCK_V=rw["BLOCK_V"]),
                        rw["num_warps"], 1, (cdiv(rows, rw["ROWS"]),))


def plan_fused(n: int, h: int, v: int, *, dtype: torch.dtype = torch.bfloat16, arch: int | None = 90,
               schedule: str = "fused", n_active: int | None = None, needs_dhidden: bool = True,
               needs_dweight: bool = True, has_bias: bool = False, n_forward_only: int = 0) -> FusedPlan:
    """The plan of one fused call (or, with ``schedule="forward"``, of a forward without gradients).

    ``n_active``: rows that get a gradient (default: all); ``n_forward_only``: rows of the fused schedule
    that only need their log-probs (weight 0, or outside a given entropy mask)."""
    if schedule not in ("fused", "recompute", "forward"):
        raise ValueError(f"schedule: got {schedule!r}; accepted: fused, recompute, forward")
    n_active = n if n_active is None else n_active
    es = elem_size(dtype)
    tile = tile_config(dtype, arch, h=h, v=v)
    one = 2.0 * h * v
    floor = (6.0 if schedule != "forward" else 2.0) * n * h * v
    vec = 12 * n * 4  # per-row fp32 vectors (logp, entropy, lse, coefficients, gathers)
    n_vt = cdiv(v, tile.BLOCK_V)
    if schedule == "forward":
        part = 4 * n_vt * n * 4
        return FusedPlan("forward", n, h, v, 0, str(dtype).replace("torch.", ""), arch, tile, None, one * n, floor,
                         part + vec, n * h * es + v * h * es * max(1, cdiv(n, tile.BLOCK_N * tile.GROUP_N)) + 2 * part,
                         2 * part, forward_launches(n, h, v, dtype, arch, has_bias=has_bias, store_z=False))
    grads = (n * h * es if needs_dhidden else 0) + (v * h * es if needs_dweight else 0) + (v * 4 if has_bias else 0)
    blocks = plan_blocks(n_active, h, v, dtype=dtype, tile=tile, needs_dweight=needs_dweight, fixed_bytes=grads + vec)
    gemms_per_row = 1 + int(needs_dhidden) + int(needs_dweight)
    if schedule == "fused":
        flops = one * (gemms_per_row * n_active + n_forward_only)
        fwd_rows = n_forward_only
    else:
        flops = one * (n + (gemms_per_row - 0) * n_active)
        fwd_rows = n
    fwd_part = 4 * n_vt * fwd_rows * 4
    block_peak = blocks.workspace_bytes + blocks.partial_bytes + 2 * blocks.rows_per_block * h * es
    dw32 = v * h * 4 if blocks.dw_accum == "fp32" else 0
    peak = grads + vec + dw32 + max(fwd_part, block_peak)
    # HBM traffic: logits written in fp32, read back and rewritten as dlogits, read by the two GEMMs; the
    # operands of every GEMM once per L2 group; dW read-modify-written once per block after the first
    z_traffic = n_active * v * (4 + 4 + es + es * (gemms_per_row - 1))
    w_traffic = v * h * es * (cdiv(n_active, tile.BLOCK_N * tile.GROUP_N) + blocks.n_blocks * (gemms_per_row - 1))
    dw_traffic = (blocks.n_blocks - 1) * v * h * (8 if blocks.dw_accum == "fp32" else 2 * es) if needs_dweight else 0
    x_traffic = (n_active + fwd_rows) * h * es * 3
    launches = forward_launches(blocks.rows_per_block, h, v, dtype, arch, has_bias=has_bias, store_z=True,
                                stats=schedule == "fused")
    launches.append(dlogits_launch(blocks.rows_per_block, in_place=es != 4, has_dbias=has_bias))
    if fwd_rows:
        launches += forward_launches(fwd_rows, h, v, dtype, arch, has_bias=has_bias, store_z=False)
    if blocks.dw_accum == "fp32":
        launches.append(mm_accumulate_launch(v, h, arch))
    rowwise = n_active * v * (4 + es) + fwd_part * 2 + (4 * n_vt * n_active * 8 if schedule == "fused" else 0)
    return FusedPlan(schedule, n, h, v, n_active, str(dtype).replace("torch.", ""), arch, tile, blocks, flops,
                     floor, peak, z_traffic + w_traffic + dw_traffic + x_traffic + fwd_part * 2, rowwise, launches)


def mm_accumulate_launch(m: int, n: int, arch: int | None, dtype: torch.dtype = torch.bfloat16) -> KernelLaunch:
    if interpreting():
        bm, bn, bk, warps, stages = 16, 16, 16, 1, 1
    elif m % 16 or n % 16:  # rows not 16-byte aligned: the smaller tile does not spill
        bm, bn, bk, warps, stages = 128, 64, 64, 8, 3
    elif arch is not None and arch >= 90:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 4  # 128 x 256 spills (compile-check)
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    return KernelLaunch("_mm_accumulate_kernel", "linear_logprob_entropy",
                        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, DOT_PRECISION=dot_precision(dtype)),
                        warps, stages, (cdiv(m, bm) * cdiv(n, bn),), gemm=True)


def policy_loss_launch(n: int, *, loss: int, kl: int, has_lr: bool, has_delta: bool, has_dual: bool, has_ref: bool,
                       has_isw: bool, has_ent: bool, has_emask: bool) -> KernelLaunch:
    block = 64 if interpreting() else 1024
    return KernelLaunch("_policy_loss_kernel", "policy_loss",
                        dict(LOSS=loss, KL=kl, HAS_LR=has_lr, HAS_DELTA=has_delta, HAS_DUAL=has_dual, HAS_REF=has_ref,
                             HAS_ISW=has_isw, HAS_ENT=has_ent, HAS_EMASK=has_emask, BLOCK=block),
                        4, 1, (max(1, cdiv(n, block)),))


def format_plan(p: FusedPlan) -> str:
    gb = 1e9
    lines = [f"shape N={p.n} H={p.h} V={p.v} {p.dtype} sm_{p.arch}: schedule {p.schedule}, "
             f"{p.n_active} active rows",
             f"  tile BLOCK_N={p.tile.BLOCK_N} BLOCK_V={p.tile.BLOCK_V} BLOCK_H={p.tile.BLOCK_H} "
             f"GROUP_N={p.tile.GROUP_N} warps={p.tile.num_warps} stages={p.tile.num_stages}"]
    if p.blocks is not None:
        b = p.blocks
        lines.append(f"  row blocks: {b.n_blocks} x {b.rows_per_block} rows; logits workspace "
                     f"{b.workspace_bytes / gb:.3f} GB; dW accumulation: {b.dw_accum}")
    lines.append(f"  GEMM FLOPs {p.gemm_flops / 1e12:.2f} TFLOP = {p.gemm_equivalents:.2f} GEMM-equivalents "
                 f"= {p.x_floor:.2f}x the floor ({p.floor_flops / 1e12:.2f} TFLOP)")
    lines.append(f"  peak extra memory {p.peak_extra_bytes / gb:.3f} GB (gradients included); "
                 f"estimated HBM traffic {p.hbm_bytes / gb:.1f} GB ({p.rowwise_bytes / gb:.1f} GB in memory-bound "
                 f"kernels); roofline guess {estimate_ms(p):.1f} ms on an H100 (floor {p.floor_flops / 750e9:.1f} ms)")
    return "\n".join(lines)


def estimate_ms(p: FusedPlan, tflops: float = 750.0, tbps: float = 3.35) -> float:
    """A roofline guess, not a measurement: GEMM time (compute or their operand traffic, whichever is larger)
    plus the memory-bound kernels' traffic time (defaults: an H100 SXM's realistic bf16 rate and HBM3)."""
    gemm_traffic = p.hbm_bytes - p.rowwise_bytes
    return (max(p.gemm_flops / (tflops * 1e12), gemm_traffic / (tbps * 1e12)) + p.rowwise_bytes / (tbps * 1e12)) * 1e3


def shared_limit(arch: int | None) -> int:
    if arch is None:
        return math.inf
    return SM_SHARED_LIMIT.get(arch, 101376)
