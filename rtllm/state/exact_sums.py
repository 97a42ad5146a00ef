"""The six per-ray sums of the reduce pass, computed exactly: independent of sharding and order.

A chain sharded over W ranks is bit-identical to the one-process chain only if the sums between
the two passes are the same bits whatever the partition of the elements. Floating-point sums are
not: fp32 partials per piece and a float64 sum across shards and ranks round differently when
the pieces differ. So here every term is formed exactly and summed exactly:

- each term (v*v, g*g, v*g, n*n, n*v, n*g) of fp32 (or bf16) factors is exact in float64
  (24 + 24 significant bits <= 53; the exponent range of fp32 products fits float64's);
- a row of terms is summed exactly by cutting it into levels: with M the largest |term|
  (M < 2**(s + D)), every term rounded to a multiple of 2**s (add and remove 1.5 * 2**(s + 52):
  exact, as |term| < 2**(s + 51)) is a multiple of 2**s of magnitude <= 2**(s + D); n of them
  (n * 2**D <= 2**52) sum in float64 without rounding, in any order. They are subtracted
  (exactly: the remainders are the terms' low bits, |.| <= 2**(s - 1)) and the next level starts
  below the largest remainder, until nothing remains: ~3-6 levels of 5 vectorized passes for
  real data (each term has <= 48 significant bits);
- the level sums are added as Python integers at their bit positions: the exact sum of the row
  as a multiple of 2**LSB_EXP, held in int64 limbs of LIMB_BITS bits. Integer addition is
  associative, so local sums over any pieces, and an integer all-reduce of them over any ranks,
  give the same integer;
- that integer is rounded to float64 once (correctly rounded), so every rank and the
  one-process chain see the same six float64 numbers per ray.

Any exact method gives the same integer, so it does not depend on how the elements are cut
into chunks (EXACT_CHUNK) or levels. The first implementation (every term's significand
scattered into the limbs with index_add_, 6-9x slower) is kept in scripts/bench_exact_sums.py,
which checks that both give the same integers and times them (docs/benchmarks.md, issue 14).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

LIMB_BITS = 30
LSB_EXP = -352  # value = integer * 2**LSB_EXP; the smallest fp32 product is 2**-298 (53 bits wide)
NUM_LIMBS = 23  # up to bit 30*23 - 352 = 338: sums of 2**31 terms of at most 2**256 fit
# Elements per chunk. CPU: small enough that a chunk's five float64 buffers stay in cache (2**15
# to 2**18 were within noise of each other on the 2-core test machine, 2**20 was 1.8x slower);
# CUDA: large, as each level costs a few launches and one host sync.
EXACT_CHUNK, EXACT_CHUNK_CUDA = 2**16, 2**22
EXACT_SCRATCH_BYTES = 42  # float64 v, g, noise, one row of terms, its level; a finiteness mask
_LIMB_MASK = (1 << LIMB_BITS) - 1


def carry_(limbs: Tensor) -> Tensor:
    """Carry int64 limbs [..., NUM_LIMBS] one limb up, in place: each limb but the top keeps its
    low 30 bits plus the carry of the limb below (one pass, not a full normalization).

    The value is unchanged (the top limb keeps the sign); afterwards |limb| < 2**34 for limbs
    that were < 2**63, so they can again absorb billions of additions of < 2**30 each.
    """
    carry = limbs[..., :-1] >> LIMB_BITS  # arithmetic shift: floor division, also for negatives
    limbs[..., :-1] -= carry << LIMB_BITS
    limbs[..., 1:] += carry
    return limbs


def int_to_limbs(value: int) -> list[int]:
    """A multiple of 2**LSB_EXP (the integer `value`) as limbs: each but the top in [0, 2**30),
    the top one signed."""
    top = LIMB_BITS * (NUM_LIMBS - 1)
    return [(value >> (LIMB_BITS * k)) & _LIMB_MASK for k in range(NUM_LIMBS - 1)] + [value >> top]


def exact_row_sum(terms: Tensor, scratch: Tensor) -> int:
    """The exact sum of float64 `terms` (1-D, finite, every term a multiple of 2**LSB_EXP) as an
    integer multiple of 2**LSB_EXP. `terms` is overwritten (it ends as zeros); `scratch` is a
    float64 buffer of the same size."""
    # n * 2**digits <= 2**52: a level's multiples of 2**shift sum in float64 without rounding
    digits = 52 - max(terms.numel(), 1).bit_length()
    total = 0
    low, high = torch.aminmax(terms)
    largest = max(-float(low), float(high))
    while largest != 0.0:
        shift = math.frexp(largest)[1] - digits  # |terms| < 2**(shift + digits) <= 2**(shift + 51)
        # terms rounded to multiples of 2**shift: adding and removing 1.5 * 2**(shift + 52)
        # leaves the bits from 2**shift up (round to nearest even), exactly
        magic = 1.5 * 2.0 ** (shift + 52)
        level = torch.add(terms, magic, out=scratch).sub_(magic)
        terms.sub_(level)  # exact: the remainders, |.| <= 2**(shift - 1)
        level_sum, low, high = torch.stack([level.sum(), *torch.aminmax(terms)]).tolist()  # one sync
        # every remainder is a multiple of 2**-298 (fp32 products), so largest >= 2**-298 and
        # shift >= -297 - 51 > LSB_EXP: the level sum is an integer at a nonnegative position
        total += int(math.ldexp(level_sum, -shift)) << (shift - LSB_EXP)
        largest = max(-low, high)
    return total


def _sanitize(x: Tensor, bad: Tensor, slot: int) -> Tensor:
    """x with its non-finite elements (counted in bad[slot]) as zeros: their terms are left out."""
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return x
    bad[slot] += (~finite).sum()
    return x.masked_fill_(~finite, 0.0)


def _chunks(pieces: Iterable[tuple[Tensor, Tensor, Tensor | None]], size: int):
    """(v, g, noise) chunks of at most `size` elements: large pieces cut, small ones joined."""
    pending, count = [], 0
    for v, g, noise in pieces:
        for start in range(0, v.numel(), size):
            stop = min(start + size, v.numel())
            if count + stop - start > size:
                yield pending, count
                pending, count = [], 0
            pending.append((v[start:stop], g[start:stop], None if noise is None else noise[start:stop]))
            count += stop - start
    if pending:
        yield pending, count


_SCRATCH: dict[torch.device, Tensor] = {}


def _scratch(device: torch.device, count: int) -> Tensor:
    """float64 [5, >= count] kept per device between calls (at most [5, EXACT_CHUNK]): a fresh
    buffer of this size costs more in page faults than the passes that use it."""
    held = _SCRATCH.get(device)
    if held is None or held.shape[1] < count:
        held = _SCRATCH[device] = torch.empty(5, count, dtype=torch.float64, device=device)
    return held


def _join(parts: list[Tensor], out: Tensor) -> Tensor:
    """The parts one after another in `out` (float64): torch.cat with the conversion."""
    at = 0
    for p in parts:
        out[at : at + p.numel()].copy_(p)
        at += p.numel()
    return out[:at]


def pieces_limbs(pieces: Iterable[tuple[Tensor, Tensor, Tensor | None]], *,
                 chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact fixed-point sums [6, NUM_LIMBS] over all (v, g, noise) pieces, and their non-finite
    counts: bad = int64 [2], non-finite elements of v and of g. Non-finite values contribute no
    terms; the caller turns a count > 0 into NaN sums, as the fast reduce pass's NaN would.
    noise None (in every piece): the three noise sums are zero. chunk: elements per pass
    (default EXACT_CHUNK, on CUDA EXACT_CHUNK_CUDA); the result does not depend on it."""
    pieces = list(pieces)
    if chunk is None:
        on_cuda = bool(pieces) and pieces[0][0].device.type == "cuda"
        chunk = EXACT_CHUNK_CUDA if on_cuda else EXACT_CHUNK
    totals, bad, buffers = [0] * 6, None, None
    for chunk_pieces, count in _chunks(pieces, chunk):
        if buffers is None:  # v, g, noise, a row of terms, a level: float64, reused
            device = chunk_pieces[0][0].device
            buffers = _scratch(device, count)
            bad = torch.zeros(2, dtype=torch.int64, device=device)
        v, g, noise, terms, scratch = (b[:count] for b in buffers)
        v = _sanitize(_join([p[0] for p in chunk_pieces], v), bad, 0)
        g = _sanitize(_join([p[1] for p in chunk_pieces], g), bad, 1)
        factors = [(v, v), (g, g), (v, g)]
        if chunk_pieces[0][2] is not None:  # noise is finite (Philox normals)
            noise = _join([p[2] for p in chunk_pieces], noise)
            factors += [(noise, noise), (noise, v), (noise, g)]
        for row, (a, b) in enumerate(factors):
            totals[row] += exact_row_sum(torch.mul(a, b, out=terms), scratch)
    if bad is None:  # no elements at all
        return torch.zeros(6, NUM_LIMBS, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    limbs = torch.tensor([int_to_limbs(t) for t in totals], dtype=torch.int64, device=bad.device)
    return limbs, bad


def shard_limbs(v: Tensor, g: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """Exact fixed-point sums [6, NUM_LIMBS] of one shard's terms, and its non-finite counts
    (pieces_limbs of the one piece)."""
    limbs, bad = pieces_limbs([(v, g, noise)])
    return limbs.to(v.device), bad.to(v.device)


def limbs_to_ints(limbs: Tensor) -> list[int]:
    """Each row of int64 limbs [..., NUM_LIMBS] (host) as the integer it holds (any carry state)."""
    return [sum(int(limb) << (LIMB_BITS * k) for k, limb in enumerate(row))
            for row in limbs.reshape(-1, NUM_LIMBS).tolist()]


def limbs_to_float(limbs: Tensor) -> list[float]:
    """Each row of int64 limbs [..., NUM_LIMBS] (host) as its correctly rounded float64 value."""
    # int -> float rounds to nearest even; the power-of-two scale is exact (no subnormals for
    # any sum this sampler meets: the smallest nonzero sum here is >= 2**-298).
    return [math.ldexp(float(value), LSB_EXP) for value in limbs_to_ints(limbs)]
