"""`rubric-fast compile-check`: compile every Triton kernel variant ahead of time for real GPUs, no GPU needed.

The Triton interpreter (TRITON_INTERPRET=1, the CPU tests) accepts code that a GPU compile rejects, so this
compiles, from a fresh Triton cache, exactly what the launchers would launch (kernels/plan.py: kernel,
constexprs, warps, stages; Triton's own argument specialization) for each architecture and shape, with
Triton's compiler down to PTX and a cubin (ptxas ships with Triton). One row per variant: compiled or the
error, the MMA instruction in the PTX (wgmma on sm_90, mma.sync on sm_80; none for exact fp32), registers
and spill bytes (``ptxas -v``), shared memory. Exit 1 on a compile failure, a 16-bit GEMM kernel without
tensor-core MMA (wgmma on sm_90), a spill in a GEMM kernel, or shared memory over the architecture's limit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

DEFAULT_SHAPES = ((16384, 2048, 151936), (8192, 4096, 128256))
DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class Row:
    kernel: str
    arch: int
    variant: str
    compiled: bool
    mma: str = ""
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    gemm: bool = False
    problem: str = ""


def _variants(arch: int, shapes, dtypes):
    """(label, KernelLaunch, args) for every variant the launchers would launch at these shapes."""
    import torch

    from rubric_fast.kernels import plan

    def dummy(dtype, numel=16):
        return torch.empty(numel, dtype=dtype)

    out = []
    for n, h, v in shapes:
        for dname in dtypes:
            dt = getattr(torch, dname)
            x = dummy(dt)
            i64 = dummy(torch.int64)
            f = dummy(torch.float32)
            for has_bias in (False, True):
                for schedule in ("forward", "fused", "recompute"):
                    for needs_dweight in ((True, False) if schedule != "forward" else (False,)):
                        # frozen head: no dW; token-sparse: a fifth of the rows active
                        for n_active in ((n, n // 5) if schedule == "recompute" else (n,)):
                            p = plan.plan_fused(n, h, v, dtype=dt, arch=arch, schedule=schedule, n_active=n_active,
                                                needs_dweight=needs_dweight, has_bias=has_bias)
                            for spec in p.launches:
                                args = _args_for(spec, x, i64, f, p, h, v)
                                out.append((f"{dname} N{n} H{h} V{v} {schedule} bias={int(has_bias)}", spec, args))
            # the autotuning candidates, in their heaviest form (stored logits, statistics, bias)
            for tile in plan.tile_candidates(dt, arch, h=h, v=v)[1:]:
                spec = plan.KernelLaunch("_fwd_tile_kernel", "linear_logprob_entropy",
                                         dict(HAS_BIAS=True, STORE_Z=True, STATS=True,
                                              DOT_PRECISION=plan.dot_precision(dt), **tile.constexprs()),
                                         tile.num_warps, tile.num_stages, plan.forward_grid(n, v, tile), gemm=True)
                p = plan.plan_fused(n, h, v, dtype=dt, arch=arch)
                out.append((f"{dname} N{n} H{h} V{v} autotune candidate", spec, _args_for(spec, x, i64, f, p, h, v)))
            # dW accumulated in fp32 over row blocks (taken when the budget leaves blocks of >= 1024 rows)
            if dt != torch.float32:
                p = plan.plan_fused(min(n, 4096), h, v, dtype=dt, arch=arch)
                spec = plan.mm_accumulate_launch(v, h, arch, dt)
                out.append((f"{dname} N{n} H{h} V{v} dW fp32 accumulation", spec, _args_for(spec, x, i64, f, p, h, v)))
    # the policy-loss kernel: every loss and KL code, with and without each optional input
    f = dummy(torch.float32)
    for loss in range(4):
        for kl in range(3):
            for flags in ((False,) * 7, (True,) * 7):
                has_lr = flags[0] and loss == 3
                spec = plan.policy_loss_launch(16384, loss=loss, kl=kl, has_lr=has_lr, has_delta=flags[1],
                                               has_dual=flags[2], has_ref=flags[3], has_isw=flags[4],
                                               has_ent=flags[5], has_emask=flags[6])
                args = (f,) * 13 + (16384,) + (0.2,) * 8
                out.append((f"loss={loss} kl={kl} optional={int(flags[0])}", spec, args))
    return out


def _args_for(spec, x, i64, f, p, h, v):
    """Runtime arguments with the values that Triton specializes on (pointers' dtypes and alignment; ints
    equal to 1 or divisible by 16), as the launchers pass them."""
    n = p.blocks.rows_per_block if p.blocks is not None else p.n
    if spec.kernel == "_fwd_tile_kernel":
        return (x, x, x, i64, f, f, n, v, h, h, h, v, 1.0)
    if spec.kernel == "_combine_kernel":
        n_vt = -(-v // p.tile.BLOCK_V)
        return (f, i64, f, f, f, n, n_vt, -100)
    if spec.kernel == "_dlogits_kernel":
        dz_stride = 2 * v if x.element_size() == 2 else v
        return (f, x, i64, f, f, f, f, f, n, v, v, dz_stride, 1.0)
    if spec.kernel == "_mm_accumulate_kernel":
        # c [V, H] fp32 += dz^T [V, R] (column-major view of the row-block dlogits) @ x [R, H]
        dz_stride = 2 * v if x.element_size() == 2 else v
        return (x, x, f, v, h, n, 1, dz_stride, h, 1, h)
    raise KeyError(spec.kernel)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ptxas -v on the PTX (ptxas ships with Triton)."""
    from triton.backends.nvidia import compiler as nv

    ptxas = getattr(nv, "get_ptxas", None)
    path = None
    if ptxas is not None:
        try:
            res = ptxas(arch) if "arch" in ptxas.__code__.co_varnames else ptxas()
            path = res.path if hasattr(res, "path") else res[0]
        except Exception:
            path = None
    if path is None:
        import triton

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        path = cand if os.path.exists(cand) else shutil.which("ptxas")
    if path is None:
        return -1, -1
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run([path, "-v", f"--gpu-name={sm}", src, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores", text) + re.findall(r"(\d+) bytes spill loads", text)
    return (max(map(int, regs)) if regs else -1), (sum(map(int, spills)) if spills else 0)


def compile_one(spec, args, arch: int, fn=None):
    """Compile one variant through Triton's own specialization (as a launch would), for ``arch``
    (``fn``: the @triton.jit function, default the one ``spec`` names)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from rubric_fast.kernels import linear_logprob_entropy, policy_loss

    if fn is None:
        fn = getattr({"linear_logprob_entropy": linear_logprob_entropy, "policy_loss": policy_loss}[spec.module],
                     spec.kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(spec.constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _spec_class(a) -> str:
    """What Triton specializes a scalar argument on: 1, divisible by 16, or neither."""
    if isinstance(a, bool) or not isinstance(a, int):
        return type(a).__name__
    return "1" if a == 1 else ("16" if a % 16 == 0 else "i")


def _check_one(job) -> Row:
    """Compile one variant and judge it (a process-pool task: every argument pickles)."""
    from rubric_fast.kernels import plan

    arch, label, spec, args = job
    cx = ",".join(f"{k}={v}" for k, v in spec.constexprs.items())
    row = Row(spec.kernel, arch, f"{label} [{cx} w{spec.num_warps} s{spec.num_stages}]", False, gemm=spec.gemm)
    try:
        k = compile_one(spec, args, arch)
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the report
        msg = " ".join(str(exc).split())
        row.problem = f"compile failed: {type(exc).__name__}: {msg[:400]}"
        return row
    row.compiled = True
    ptx = k.asm.get("ptx", "")
    row.mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
    row.shared_bytes = int(getattr(k.metadata, "shared", -1))
    row.registers, row.spill_bytes = _ptxas_usage(ptx, arch)
    problems = []
    is_16bit = spec.constexprs.get("DOT_PRECISION") == "tf32" and "float32" not in label
    if spec.gemm and is_16bit and arch >= 90 and row.mma != "wgmma":
        problems.append(f"GEMM kernel without wgmma on sm_{arch} ({row.mma})")
    if spec.gemm and is_16bit and 80 <= arch < 90 and row.mma == "none":
        problems.append(f"GEMM kernel without tensor-core MMA on sm_{arch}")
    if spec.gemm and row.spill_bytes > 0:
        problems.append(f"{row.spill_bytes} bytes of register spills in a GEMM kernel")
    if row.shared_bytes > plan.shared_limit(arch):
        problems.append(f"shared memory {row.shared_bytes} B over sm_{arch}'s {plan.shared_limit(arch)} B")
    row.problem = "; ".join(problems)
    return row


def check(archs, shapes, dtypes=DTYPES, verbose=False, jobs: int | None = None) -> list[Row]:
    """Every distinct variant (as Triton would specialize it) compiled once, on ``jobs`` processes (default:
    the CPU count; each compile is single-threaded)."""
    todo = []
    seen = set()
    for arch in archs:
        for label, spec, args in _variants(arch, shapes, dtypes):
            key = (arch, spec.kernel, tuple(sorted(spec.constexprs.items())), spec.num_warps, spec.num_stages,
                   tuple(str(a.dtype) if hasattr(a, "dtype") else _spec_class(a) for a in args))
            if key not in seen:
                seen.add(key)
                todo.append((arch, label, spec, args))
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    if jobs == 1:
        results = map(_check_one, todo)
    else:
        import concurrent.futures
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(_check_one, todo)
    rows = []
    try:
        for row in results:
            rows.append(row)
            if verbose:
                print(_format_row(row), flush=True)
    finally:
        if jobs > 1:
            pool.shutdown()
    return rows


def _format_row(r: Row) -> str:
    status = "ok" if r.compiled and not r.problem else "FAIL"
    return (f"{status:4} sm_{r.arch} {r.kernel:22} mma={r.mma or '-':8} regs={r.registers:4} "
            f"spill={r.spill_bytes:5} smem={r.shared_bytes:7}  {r.variant}" + (f"\n     -> {r.problem}" if r.problem else ""))


def _parse_shape(text: str):
    try:
        n, h, v = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape: expected N,H,V (three integers), got {text!r}") from None
    if min(n, h, v) <= 0:
        raise argparse.ArgumentTypeError(f"--shape: N, H and V must be positive, got {text!r}")
    return n, h, v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", type=int, action="append", choices=(80, 86, 89, 90),
                   help="compute capability to compile for (repeatable; default: 90 and 80)")
    p.add_argument("--shape", type=_parse_shape, action="append", metavar="N,H,V",
                   help="problem shape (repeatable; default: the two benchmark shapes)")
    p.add_argument("--dtype", action="append", choices=DTYPES, help="input dtype (repeatable; default: all three)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--keep-cache", action="store_true",
                   help="use the existing TRITON_CACHE_DIR instead of a fresh one (a warm cache can hide failures)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every row as it compiles")
    p.add_argument("-j", "--jobs", type=int, default=None, help="compile processes (default: the CPU count)")


def run(args) -> int:
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as exc:
        print(f"rubric-fast compile-check: triton is not installed ({exc}); pip install 'rubric_fast[triton]'",
              file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("rubric-fast compile-check: TRITON_INTERPRET=1 is set; unset it (the check compiles for GPUs)",
              file=sys.stderr)
        return 2
    archs = args.arch or [90, 80]
    shapes = args.shape or list(DEFAULT_SHAPES)
    dtypes = args.dtype or list(DTYPES)
    cache = None
    if not args.keep_cache:
        cache = tempfile.mkdtemp(prefix="rubric_fast_triton_cache_")
        os.environ["TRITON_CACHE_DIR"] = cache
    try:
        rows = check(archs, shapes, dtypes, verbose=args.verbose, jobs=args.jobs)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    bad = [r for r in rows if not r.compiled or r.problem]
    if not args.verbose:
        for r in rows:
            print(_format_row(r))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=1)
    gemm_rows = [r for r in rows if r.gemm and r.compiled]
    print(f"compile-check: {len(rows)} variants for sm_{', sm_'.join(map(str, archs))}; {len(bad)} failed; "
          f"GEMM kernels: {sum(r.mma == 'wgmma' for r in gemm_rows)} wgmma, "
          f"{sum(r.mma == 'mma.sync' for r in gemm_rows)} mma.sync, {sum(r.mma == 'none' for r in gemm_rows)} FMA")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rubric-fast compile-check", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
