"""pytest-benchmark microbenchmarks: providers x shapes of linear -> log-prob / entropy -> GRPO loss.

    python -m pytest bench/test_bench_kernels.py --benchmark-json=bench.json

Providers and cases are those of ``rubric-fast bench`` (rubric_fast/bench_command.py): on a GPU the
full-size shapes with every provider, on a CPU tiny shapes with the ops and torch providers. Each benchmark
records the effective TFLOP/s, the peak extra memory and the floor's FLOPs in ``extra_info``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")

from rubric_fast import bench_command as bc

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
CASES = bc.GPU_CASES if GPU else bc.CPU_CASES
PROVIDERS = bc.GPU_PROVIDERS if GPU else bc.CPU_PROVIDERS
_INPUTS: dict = {}  # built on the device once per shape, shared by every provider


def _inputs(case):
    key = (case.n, case.h, case.v)
    if key not in _INPUTS:
        _INPUTS.clear()  # one shape at a time on the device
        _INPUTS[key] = bc.make_inputs(case, DEV, DTYPE)
    return _INPUTS[key]


def _sync():
    if GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bench(benchmark, case, provider):
    inp = _inputs(case)
    try:
        fn = bc.provider_fn(provider, case, inp)
        fn()
        _sync()
    except bc.Unavailable as exc:
        pytest.skip(str(exc))
    except torch.OutOfMemoryError:
        pytest.skip("OOM")

    def step():
        fn()
        _sync()

    if GPU:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.pedantic(step, rounds=10, warmup_rounds=1, iterations=1)
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(
        flops=bc.floor_flops(case), tflops=bc.floor_flops(case) / med / 1e12, n=case.n, h=case.h, v=case.v,
        peak_extra_gb=(torch.cuda.max_memory_allocated() - base) / bc.GB if GPU else None)
