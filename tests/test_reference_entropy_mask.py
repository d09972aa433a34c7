"""Reference entropy_mask (single process, by hand and vs. a Python oracle) and distributed_entropy_mask over
torch.distributed gloo on 2 and 3 spawned processes (must equal entropy_mask of the rank-major concatenation).
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
import torch.multiprocessing as mp

from rubric_fast.reference import distributed_entropy_mask, entropy_mask, selection_count
from procs import free_port

# ---------------------------------------------------------------- single process, by hand

#            idx:  0    1    2      3    4    5    6
ENTROPY = [0.5, 2.0, 100.0, 2.0, 3.0, 1.0, 0.1]
VALID = [True, True, False, True, True, True, True]  # n_valid = 6; idx 2 (largest entropy) is invalid
# valid entropies sorted descending, ties by lower index: 3.0 (4), 2.0 (1), 2.0 (3), 1.0 (5), 0.5 (0), 0.1 (6)
HAND = [
    (1.0, [0, 1, 3, 4, 5, 6]),      # k = 6: every valid token, never idx 2
    (0.5, [1, 3, 4]),               # k = ceil(3) = 3
    (0.4, [1, 3, 4]),               # k = ceil(2.4) = 3
    (0.3, [1, 4]),                  # k = ceil(1.8) = 2: tie 2.0 at idx 1 and 3 -> lower index 1
    (4 / 6, [1, 3, 4, 5]),          # k = ceil(4) = 4 (no round-up from 4/6*6)
    (0.2, [4, 1]),                  # k = ceil(1.2) = 2
    (1e-6, [4]),                    # k = ceil(6e-6) = 1
    (1e-9, [4]),                    # k = ceil(6e-9) = 1
]


@pytest.mark.parametrize("frac,expected", HAND)
def test_hand_selection(frac, expected):
    mask = entropy_mask(torch.tensor(ENTROPY), torch.tensor(VALID), frac)
    assert mask.dtype == torch.bool
    assert sorted(torch.nonzero(mask).squeeze(1).tolist()) == sorted(expected)


def test_selection_count_exact_products():
    # 0.2 * 10 = 2.0000000000000004 in floating point: must not round up to 3
    assert selection_count(0.2, 10) == 2
    assert selection_count(0.7, 10) == 7   # 0.7 * 10 = 7.000000000000001
    assert selection_count(0.1, 3) == 1    # ceil(0.3)
    assert selection_count(1.0, 0) == 0
    assert selection_count(0.5, 1) == 1    # ceil(0.5)
    for n in (1, 7, 33, 1000, 123457):
        for f in (0.01, 0.2, 0.25, 0.333, 0.5, 0.9, 1.0):
            assert selection_count(f, n) == min(n, math.ceil(round(f * n, 6) - 1e-7)), (f, n)


@pytest.mark.parametrize("frac,n", [(1e-12, 6), (1e-10, 1), (3e-10, 1)])
def test_tiny_fraction_selects_one_token(frac, n):
    """k = ceil(top_fraction * n_valid) (docs/ops-math.md): any positive fraction of a non-empty set selects
    at least one token. PolicyLossConfig accepts every top_entropy_fraction in (0, 1]."""
    assert selection_count(frac, n) == 1
    mask = entropy_mask(torch.arange(float(n)), torch.ones(n, dtype=torch.bool), frac)
    assert int(mask.sum()) == 1 and bool(mask[-1])


def test_no_valid_and_errors():
    assert not entropy_mask(torch.ones(4), torch.zeros(4, dtype=torch.bool), 0.5).any()
    assert entropy_mask(torch.zeros(0), torch.zeros(0, dtype=torch.bool), 0.5).shape == (0,)
    with pytest.raises(ValueError, match="top_fraction"):
        entropy_mask(torch.ones(4), torch.ones(4, dtype=torch.bool), 1.5)
    with pytest.raises(ValueError, match="valid"):
        entropy_mask(torch.ones(4), torch.ones(4), 0.5)
    with pytest.raises(ValueError, match="entropy"):
        entropy_mask(torch.tensor([1.0, float("nan")]), torch.ones(2, dtype=torch.bool), 0.5)
    # NaN at an invalid position is fine and never selected
    m = entropy_mask(torch.tensor([1.0, float("nan")]), torch.tensor([True, False]), 1.0)
    assert m.tolist() == [True, False]


def _oracle(ent, valid, frac):
    n_valid = sum(valid)
    k = math.ceil(round(frac * n_valid, 12) - 1e-12) if n_valid else 0
    order = sorted((i for i in range(len(ent)) if valid[i]), key=lambda i: (-ent[i], i))
    return sorted(order[:k])


def test_random_against_python_oracle():
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    for _ in range(30):
        n = int(torch.randint(1, 80, (1,), generator=g))
        # few distinct values -> many ties; mixed signs
        ent = (torch.randint(-3, 4, (n,), generator=g).float() * 0.5)
        if bool(torch.rand(1, generator=g) < 0.5):
            ent = torch.randn(n, generator=g)
        valid = torch.rand(n, generator=g) < 0.7
        frac = float(torch.rand(1, generator=g)) * 0.98 + 0.01
        got = torch.nonzero(entropy_mask(ent, valid, frac)).squeeze(1).tolist()
        assert got == _oracle(ent.tolist(), valid.tolist(), frac), f"seed={seed} n={n} frac={frac}"


# ---------------------------------------------------------------- distributed (gloo)


def _make_cases(seed: int, world: int):
    """Per case: (top_fraction, [entropy_r], [valid_r]) for each rank r. Deterministic in (seed, world)."""
    g = torch.Generator().manual_seed(seed)
    cases = []

    def sizes():
        return [int(torch.randint(0, 13, (1,), generator=g)) for _ in range(world)]

    for frac in (0.05, 0.3, 0.5, 0.77, 1.0):
        ns = sizes()
        ents = [torch.rand(n, generator=g) * 5 for n in ns]  # ordinary entropies
        vals = [torch.rand(n, generator=g) < 0.8 for n in ns]
        cases.append((frac, ents, vals))
    for frac in (0.1, 0.25, 0.5, 0.6, 0.9):
        # heavy ties spanning ranks: every rank draws from {0, 0.5, 1, 2}
        ns = [7] * world
        choice = torch.tensor([0.0, 0.5, 1.0, 2.0])
        ents = [choice[torch.randint(0, 4, (n,), generator=g)] for n in ns]
        vals = [torch.rand(n, generator=g) < 0.9 for n in ns]
        cases.append((frac, ents, vals))
    for frac in (0.2, 0.5, 0.8):
        # negative values, infinities, tiny denormal-ish magnitudes: exercises the sign handling of the keys
        choice = torch.tensor([-3.5, -1.0, -1e-30, 1e-30, 1.0, 7.25, -float("inf"), float("inf"), -2e30, 3e30])
        ns = sizes()
        ents = [choice[torch.randint(0, len(choice), (n,), generator=g)] + 0.0 for n in ns]
        ents = [e + torch.randn(e.shape, generator=g) * (torch.rand(e.shape, generator=g) < 0.3) for e in ents]
        vals = [torch.rand(n, generator=g) < 0.85 for n in ns]
        cases.append((frac, ents, vals))
    # a rank with no valid tokens, a rank with no tokens at all
    ents = [torch.rand(6, generator=g) for _ in range(world)]
    vals = [torch.ones(6, dtype=torch.bool) for _ in range(world)]
    vals[0] = torch.zeros(6, dtype=torch.bool)
    ents[-1], vals[-1] = torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    cases.append((0.5, ents, vals))
    # no valid token anywhere -> k = 0
    cases.append((0.5, [torch.rand(3, generator=g) for _ in range(world)],
                  [torch.zeros(3, dtype=torch.bool) for _ in range(world)]))
    # every token equal, across all ranks: the tie share goes to the lowest ranks first
    cases.append((0.4, [torch.full((5,), 1.25) for _ in range(world)],
                  [torch.ones(5, dtype=torch.bool) for _ in range(world)]))
    # float64 input whose values are distinct in fp32 (the documented key width)
    cases.append((0.3, [torch.randn(9, generator=g, dtype=torch.float64).float().double() for _ in range(world)],
                  [torch.ones(9, dtype=torch.bool) for _ in range(world)]))
    return cases


def _edge_cases(world: int):
    """Inputs on which the fp32-key radix select can disagree with the single-process stable sort."""
    # (a) +0.0 and -0.0 compare equal (IEEE) but have different keys. -0.0 is what -(sum p log p) gives for a
    #     one-hot distribution, so a batch of confident tokens mixes the two. k = ceil(0.6 * 5) = 3:
    #     1.0, then the two lowest-position zeros (the -0.0 at positions 0 and 2 of the concatenation).
    zeros = [torch.tensor([-0.0, 1.0, -0.0]), torch.tensor([0.0, 0.0])] + [torch.zeros(0)] * (world - 2)
    zv = [torch.ones(e.numel(), dtype=torch.bool) for e in zeros]
    # (b) float64 entropies that differ only below fp32 resolution: k = 1 -> the largest, 1 + 2e-12 (pos 2)
    close = [torch.tensor([1.0, 1.0 + 1e-12], dtype=torch.float64),
             torch.tensor([1.0 + 2e-12, 0.5], dtype=torch.float64)] + \
        [torch.zeros(0, dtype=torch.float64)] * (world - 2)
    cv = [torch.ones(e.numel(), dtype=torch.bool) for e in close]
    return {"signed_zeros": (0.6, zeros, zv), "fp64_below_fp32_resolution": (0.25, close, cv)}


def _worker(rank, world, init_method, seed, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        cases = _make_cases(seed, world) + list(_edge_cases(world).values())
        masks = [distributed_entropy_mask(ents[rank], vals[rank], frac) for frac, ents, vals in cases]
        # an explicit process group over all ranks must give the same answer as the default group
        grp = dist.new_group(list(range(world)))
        frac, ents, vals = cases[0]
        masks.append(distributed_entropy_mask(ents[rank], vals[rank], frac, process_group=grp))
        torch.save(masks, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


_RESULTS: dict = {}


def _results(world, tmp_path_factory):
    """One spawn per world size for the whole module: (seed, random cases, edge cases, per-rank masks)."""
    if world not in _RESULTS:
        seed = random.randrange(2**31)
        out = tmp_path_factory.mktemp(f"dist{world}")
        init = f"tcp://127.0.0.1:{free_port()}"
        # fork, not spawn: a spawned child re-imports torch (~5-10 s each on a loaded 2-core box); the
        # children only run tiny single-threaded ops, so the fork-after-OpenMP hazard does not arise.
        mp.start_processes(_worker, args=(world, init, seed, str(out)), nprocs=world, join=True,
                           start_method="fork")
        per_rank = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]
        _RESULTS[world] = (seed, _make_cases(seed, world), _edge_cases(world), per_rank)
    return _RESULTS[world]


def _check_case(per_rank, ci, frac, ents, vals):
    expected = entropy_mask(torch.cat(ents), torch.cat(vals), frac)
    got = torch.cat([masks[ci] for masks in per_rank])
    assert got.dtype == torch.bool and got.shape == expected.shape
    if torch.equal(got, expected):
        return None
    return (f"case {ci} frac={frac}: entropies={[e.tolist() for e in ents]} valid={[v.tolist() for v in vals]}"
            f"\n  expected={expected.tolist()}\n  got     ={got.tolist()}")


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_equals_concatenated(world, tmp_path_factory):
    seed, cases, _, per_rank = _results(world, tmp_path_factory)
    n_edge = len(_edge_cases(world))
    assert all(len(m) == len(cases) + n_edge + 1 for m in per_rank)
    failures = [_check_case(per_rank, ci, *case) for ci, case in enumerate(cases)]
    # the explicit-process-group run of case 0 is the last mask of each rank
    failures.append(_check_case([[m[-1]] for m in per_rank], 0, *cases[0]))
    failures = [f for f in failures if f]
    assert not failures, f"seed={seed}\n" + "\n".join(failures)


@pytest.mark.parametrize("name", ["signed_zeros", "fp64_below_fp32_resolution"])
def test_distributed_edge_cases_equal_concatenated(name, tmp_path_factory, world=2):
    """Same contract on inputs where fp32 radix keys and the single-process sort may disagree."""
    _, cases, edge, per_rank = _results(world, tmp_path_factory)
    ci = len(cases) + list(edge).index(name)
    failure = _check_case(per_rank, ci, *edge[name])
    assert failure is None, f"{name}: {failure}"
