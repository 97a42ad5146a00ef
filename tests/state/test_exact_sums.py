"""Exact reduce-pass sums: equal to the correctly rounded sum, for any partition of the elements."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from rtllm.state.exact_sums import carry_, limbs_to_float, shard_limbs

pytestmark = pytest.mark.usefixtures("one_thread")


def _vectors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # magnitudes over ~40 decades, so float sums in different orders round differently
    v = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 10)
    g = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 10)
    return v, g, torch.randn(n, generator=gen)


def _fsum_reference(v, g, n) -> list[float]:
    """math.fsum is the correctly rounded sum of its (exact float64 product) inputs."""
    v, g, n = v.double(), g.double(), n.double()
    pairs = [(v, v), (g, g), (v, g), (n, n), (n, v), (n, g)]
    return [math.fsum((a * b).tolist()) for a, b in pairs]


@pytest.mark.parametrize("n", [1, 17, 1023, 4097])
def test_sums_are_the_correctly_rounded_sums(n):
    v, g, noise = _vectors(n, seed=n)
    v[0] = 3e-38  # fp32 near its smallest normal: products far below any float64 rounding
    limbs, bad = shard_limbs(v, g, noise)
    assert limbs_to_float(limbs) == _fsum_reference(v, g, noise)
    assert bad.tolist() == [0, 0]


def test_any_partition_gives_the_same_bits():
    v, g, noise = _vectors(5000, seed=1)
    whole = limbs_to_float(shard_limbs(v, g, noise)[0])
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        cuts = [0, *sorted(torch.randint(0, 5000, (6,), generator=gen).tolist()), 5000]
        parts = [shard_limbs(v[a:b], g[a:b], noise[a:b])[0] for a, b in zip(cuts, cuts[1:])]
        total = torch.zeros_like(parts[0])
        for p in reversed(parts):  # another order, too
            total += p
            carry_(total)
        assert limbs_to_float(total) == whole
    # the fast pass's fp32 partial dots do depend on the partition (else this proves nothing)
    a, b = torch.randn(5000, generator=gen), torch.randn(5000, generator=gen)
    halves = float(torch.dot(a[:2499], b[:2499])) + float(torch.dot(a[2499:], b[2499:]))
    assert halves != float(torch.dot(a, b))


def test_without_noise_the_noise_sums_are_zero_and_non_finite_values_are_counted():
    v, g, _ = _vectors(100, seed=3)
    g[5], v[7] = float("inf"), float("nan")
    limbs, bad = shard_limbs(v, g, None)
    sums = limbs_to_float(limbs)
    assert sums[3:] == [0.0, 0.0, 0.0]
    assert bad.tolist() == [1, 1]
    keep = torch.ones(100, dtype=torch.bool)
    keep[[5, 7]] = False
    assert sums[0] == math.fsum((v[keep].double() ** 2).tolist())  # finite terms only


def test_extreme_fp32_values_sum_exactly():
    # the smallest fp32 subnormal (its square is 2**-298, the grid's floor region), the largest
    # fp32 (its square ~2**256), zeros and values far apart: many levels in one row
    tiny, huge = 2.0**-149, 3.4028234663852886e38
    v = torch.tensor([tiny, -tiny, huge, 0.0, 1.0, -3e-20, 7e-45, 1e30, -1e30, 2.5], dtype=torch.float32)
    g = torch.tensor([tiny, 1.0, -huge, 5.0, tiny, 1e20, 3.0, 1e-30, 1e-30, -1.0], dtype=torch.float32)
    noise = torch.tensor([1e-38, -tiny, 1.0, 0.0, 1e38, 1.0, -2.0, 0.5, 0.5, 1.0], dtype=torch.float32)
    limbs, bad = shard_limbs(v, g, noise)
    assert limbs_to_float(limbs) == _fsum_reference(v, g, noise)
    assert bad.tolist() == [0, 0]


def test_chunks_and_pieces_do_not_change_the_integers():
    from rtllm.state.exact_sums import limbs_to_ints, pieces_limbs

    v, g, noise = _vectors(3000, seed=4)
    whole = limbs_to_ints(pieces_limbs([(v, g, noise)])[0])
    cuts = [0, 1, 2, 700, 701, 2000, 3000]  # pieces of 1, 1, 698, 1, 1299 and 1000 elements
    pieces = [(v[a:b], g[a:b], noise[a:b]) for a, b in zip(cuts, cuts[1:])]
    for chunk in (37, 1000, 2**16):  # small pieces joined, large ones cut
        assert limbs_to_ints(pieces_limbs(pieces, chunk=chunk)[0]) == whole


def test_the_first_implementation_gives_the_same_integers():
    """scripts/bench_exact_sums.py keeps the first (index_add_) implementation to time against."""
    from repo_paths import SCRIPTS
    from rtllm.state.exact_sums import limbs_to_ints

    sys.path.insert(0, str(SCRIPTS))
    try:
        from bench_exact_sums import before_shard_limbs, vectors
    finally:
        sys.path.remove(str(SCRIPTS))
    for n, noisy in ((5000, True), (333, False)):
        v, g, noise = vectors(n, seed=n)
        v[3], g[9] = float("nan"), float("-inf")
        new, old = shard_limbs(v, g, noise if noisy else None), before_shard_limbs(v, g, noise if noisy else None)
        assert limbs_to_ints(new[0]) == limbs_to_ints(old[0]) and new[1].tolist() == old[1].tolist() == [1, 1]
