"""Scorer throughput with a local judge of fixed latency L and concurrency C (no network).

Bound: scoring B x K verdicts must take at most 1.15 x ceil(B K / C) x L. Reports verdicts per second and
the scorer's own CPU time per verdict (aim: under 1 ms). Run: ``python bench/bench_scoring.py [--B 256 --K 5
--C 64 --L 0.02]``, or under pytest-benchmark: ``pytest bench/bench_scoring.py --benchmark-only``.
Benchmarks measure; the tests never time anything.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time

from rubric_fast.judges import JudgeRequest, Verdict
from rubric_fast.rubric import Aggregation, Criterion, Rubric
from rubric_fast.scoring import CallPool, ScorerConfig, ScoringService


class FixedLatencyJudge:
    """One pool call of ``latency_s`` per criterion, through the same CallPool as the http judge."""

    name = "fixed-latency"
    holistic = False

    def __init__(self, latency_s: float, concurrency: int):
        self.latency_s = latency_s
        self.pool = CallPool(["local"], concurrency=concurrency, timeout_s=60)

    async def _one(self, c) -> Verdict:
        async def call(_endpoint):
            await asyncio.sleep(self.latency_s)
            return 1.0
        return Verdict(c.id, await self.pool.call(call), "fixed")

    async def grade(self, request: JudgeRequest) -> list[Verdict]:
        return list(await asyncio.gather(*(self._one(c) for c in request.criteria)))


def run(B: int = 256, K: int = 5, C: int = 64, L: float = 0.02, group_size: int = 8) -> dict:
    crit = [Criterion(f"c{k}", f"criterion {k}") for k in range(K)]
    rubric = Rubric("bench", [{"role": "user", "content": "q"}], crit, aggregation=Aggregation("weighted_mean"))
    judge = FixedLatencyJudge(L, C)
    svc = ScoringService(judge, ScorerConfig(group_size=group_size, min_valid=1, guard=True))
    t0 = time.perf_counter()
    proc0 = time.process_time()
    for i in range(B):
        svc.submit(i // group_size, str(i), rubric, f"response number {i} with some words")
    groups: list = []
    expected = math.ceil(B / group_size)
    while len(groups) < expected:  # the trainer knows how many groups it waits for
        got = svc.ready_groups(timeout=30.0)
        if not got:
            raise RuntimeError(f"only {len(groups)} of {expected} groups arrived")
        groups += got
    wall = time.perf_counter() - t0
    proc = time.process_time() - proc0
    svc.close()
    n = B * K
    bound = 1.15 * math.ceil(n / C) * L
    out = {"B": B, "K": K, "C": C, "L_s": L, "verdicts": n, "wall_s": wall, "bound_s": bound,
           "within_bound": wall <= bound, "verdicts_per_s": n / wall,
           "scorer_cpu_ms_per_verdict": 1000 * proc / n, "groups": len(groups)}
    return out


def test_bench_scoring(benchmark):  # pytest-benchmark entry point
    res = benchmark.pedantic(run, kwargs={"B": 128, "K": 5, "C": 64, "L": 0.02}, rounds=3, iterations=1)
    benchmark.extra_info.update(res)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--K", type=int, default=5)
    p.add_argument("--C", type=int, default=64)
    p.add_argument("--L", type=float, default=0.02)
    a = p.parse_args()
    run(B=8, K=a.K, C=a.C, L=a.L)  # warm-up
    r = run(B=a.B, K=a.K, C=a.C, L=a.L)
    print(f"B={r['B']} K={r['K']} C={r['C']} L={r['L_s'] * 1000:.0f}ms: {r['verdicts']} verdicts in "
          f"{r['wall_s']:.3f}s (bound {r['bound_s']:.3f}s, {'OK' if r['within_bound'] else 'OVER'}); "
          f"{r['verdicts_per_s']:.0f} verdicts/s; scorer CPU {r['scorer_cpu_ms_per_verdict']:.3f} ms/verdict")


if __name__ == "__main__":
    main()
