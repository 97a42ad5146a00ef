"""Exact per-ray sums (rtllm.state.exact_sums) against the first implementation and the fast pass.

"before" is a verbatim copy of the first `shard_limbs` (every term's significand scattered into
int64 limbs with index_add_); "after" is `rtllm.state.exact_sums.shard_limbs` (each row cut
into float64 levels whose sums are exact). Both must give the same integers: the script checks it.
The fast torch backend's reduce pass (fp32 partial dots) is the yardstick.

Usage: OMP_NUM_THREADS=1 python scripts/bench_exact_sums.py [--n 1e6 1e7] [--repeats 3] [--skip-before-above 2e6]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

from rtllm.state.exact_sums import LIMB_BITS, LSB_EXP, NUM_LIMBS, carry_, limbs_to_ints, shard_limbs

_BEFORE_CHUNK = 2**18
_SPLIT = 27
_MASK = (1 << LIMB_BITS) - 1


def _before_add_terms_(limbs: Tensor, terms: Tensor) -> None:
    rows, n = terms.shape
    significand, exponent = torch.frexp(terms)
    whole = (significand * 2.0**53).to(torch.int64)
    sign = torch.sign(whole)
    whole = whole.abs()
    position = exponent.to(torch.int64) - 53 - LSB_EXP
    row_base = (torch.arange(rows, device=terms.device) * NUM_LIMBS).unsqueeze(1)
    flat = limbs.view(-1)
    pieces = ((whole & ((1 << _SPLIT) - 1), position), (whole >> _SPLIT, position + _SPLIT))
    for piece, pos in pieces:
        limb = pos // LIMB_BITS
        shifted = piece << (pos - limb * LIMB_BITS)
        index = (row_base + limb).view(-1)
        flat.index_add_(0, index, ((shifted & _MASK) * sign).view(-1))
        flat.index_add_(0, index + 1, ((shifted >> LIMB_BITS) * sign).view(-1))


def before_shard_limbs(v: Tensor, g: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """The first implementation of shard_limbs (commit 3c1e4ac), kept to measure against."""
    limbs = torch.zeros(6, NUM_LIMBS, dtype=torch.int64, device=v.device)
    bad = torch.zeros(2, dtype=torch.int64, device=v.device)
    rows = 6 if noise is not None else 3
    for start in range(0, v.numel(), _BEFORE_CHUNK):
        part = slice(start, start + _BEFORE_CHUNK)
        vc, gc = v[part].double(), g[part].double()
        bad[0] += (~torch.isfinite(vc)).sum()
        bad[1] += (~torch.isfinite(gc)).sum()
        factors = [(vc, vc), (gc, gc), (vc, gc)]
        if noise is not None:
            nc = noise[part].double()
            factors += [(nc, nc), (nc, vc), (nc, gc)]
        terms = torch.stack([a * b for a, b in factors])
        terms = torch.where(torch.isfinite(terms), terms, torch.zeros((), dtype=terms.dtype))
        _before_add_terms_(limbs[:rows], terms)
        carry_(limbs)
    return limbs, bad


def vectors(n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """A velocity ~ N(0, 1), a gradient whose magnitudes span ~20 decades, fp32 noise."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 5)
    return v, g, torch.randn(n, generator=gen)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _fast_reduce(v: Tensor, g: Tensor, noise: Tensor) -> None:
    """The torch backend's fp32 partial dots (2^16 elements) summed in float64."""
    for s in range(0, v.numel(), 2**16):
        a, b, c = v[s:s + 2**16], g[s:s + 2**16], noise[s:s + 2**16]
        torch.stack([a @ a, b @ b, a @ b, c @ c, c @ a, c @ b]).double()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=float, nargs="+", default=[1e6, 1e7])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-before-above", type=float, default=float("inf"),
                   help="time the first implementation only up to this many elements")
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| elements | fast reduce | exact, before | exact, after | before / after | after / fast |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in (int(x) for x in args.n):
        v, g, noise = vectors(n)
        after = shard_limbs(v, g, noise)
        t_fast = _best(lambda: _fast_reduce(v, g, noise), args.repeats)
        t_after = _best(lambda: shard_limbs(v, g, noise), args.repeats)
        if n <= args.skip_before_above:
            before = before_shard_limbs(v, g, noise)
            # the same integers (the first implementation's limbs are carried once, not normalized)
            assert limbs_to_ints(before[0]) == limbs_to_ints(after[0]), "the sums differ"
            assert torch.equal(before[1], after[1]), "the non-finite counts differ"
            t_before = _best(lambda: before_shard_limbs(v, g, noise), args.repeats)
            b, ratio = f"{t_before:.3f} s", f"{t_before / t_after:.1f}x"
        else:
            b = ratio = "not run"
        print(f"| {n:.0e} | {t_fast * 1e3:.1f} ms | {b} | {t_after:.3f} s | {ratio} | "
              f"{t_after / t_fast:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
