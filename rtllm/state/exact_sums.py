"""The six per-ray sums of the reduce pass, computed exactly: independent of sharding and order.

A chain sharded over W ranks is bit-identical to the one-process chain only if the sums between
the two passes are the same bits whatever the partition of the elements. Floating-point sums are
not: fp32 partials per piece and a float64 sum across shards and ranks round differently when
the pieces differ. So here every term is formed exactly and summed exactly:

- each term (v*v, g*g, v*g, n*n, n*v, n*g) of fp32 (or bf16) factors is exact in float64
  (24 + 24 significant bits <= 53; the exponent range of fp32 products fits float64's);
- the float64 terms are summed as integers: a term m * 2**e becomes its 53-bit integer
  significand placed at bit position e - 53 - LSB_EXP of a fixed-point number held in int64
  limbs of LIMB_BITS bits. Integer addition is associative, so local sums over any pieces, and an
  integer all-reduce of them over any ranks, give the same integer;
- that integer is rounded to float64 once (correctly rounded), so every rank and the
  one-process chain see the same six float64 numbers per ray.

The cost is ~20 elementwise integer ops per term instead of one fused dot (see docs/sharding.md);
the chain that uses these sums is the reference the sharded chain must equal, not the default.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LIMB_BITS = 30
LSB_EXP = -352  # value = integer * 2**LSB_EXP; the smallest fp32 product is 2**-298 (53 bits wide)
NUM_LIMBS = 23  # up to bit 30*23 - 352 = 338: sums of 2**31 terms of at most 2**256 fit
EXACT_CHUNK = 2**18  # elements per pass: ~600 bytes of temporaries each; 4 * 2**18 limb additions < 2**63
_SIGNIFICAND_SPLIT = 27  # a 53-bit significand in two pieces, each < 2**27, so piece << 29 < 2**56
_LIMB_MASK = (1 << LIMB_BITS) - 1


def carry_(limbs: Tensor) -> Tensor:
    """Normalize int64 limbs [..., NUM_LIMBS] in place: every limb but the top one in [0, 2**30).

    The value is unchanged (the top limb keeps the sign); afterwards limbs can again absorb
    2**32 additions of < 2**30 each without overflow.
    """
    carry = limbs[..., :-1] >> LIMB_BITS  # arithmetic shift: floor division, also for negatives
    limbs[..., :-1] -= carry << LIMB_BITS
    limbs[..., 1:] += carry
    return limbs


def add_terms_(limbs: Tensor, terms: Tensor) -> None:
    """limbs [R, NUM_LIMBS] (int64) += exact fixed-point value of each row of terms [R, n] (float64).

    Every term must be finite and a product of two fp32-representable numbers (or one such
    number squared); zeros contribute nothing.
    """
    rows, n = terms.shape
    if n == 0:
        return
    significand, exponent = torch.frexp(terms)  # terms = significand * 2**exponent, |s| in [0.5, 1)
    whole = (significand * 2.0**53).to(torch.int64)  # exact: |whole| < 2**53
    sign = torch.sign(whole)
    whole = whole.abs()
    position = exponent.to(torch.int64) - 53 - LSB_EXP  # bit position of whole's lowest bit
    row_base = (torch.arange(rows, device=terms.device) * NUM_LIMBS).unsqueeze(1)
    flat = limbs.view(-1)
    pieces = ((whole & ((1 << _SIGNIFICAND_SPLIT) - 1), position),
              (whole >> _SIGNIFICAND_SPLIT, position + _SIGNIFICAND_SPLIT))
    for piece, pos in pieces:
        limb = pos // LIMB_BITS
        shifted = piece << (pos - limb * LIMB_BITS)  # < 2**56
        index = (row_base + limb).view(-1)
        flat.index_add_(0, index, ((shifted & _LIMB_MASK) * sign).view(-1))
        flat.index_add_(0, index + 1, ((shifted >> LIMB_BITS) * sign).view(-1))


def shard_limbs(v: Tensor, g: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """Exact fixed-point sums [6, NUM_LIMBS] of one shard's terms, and its non-finite counts.

    Returns (limbs, bad) with bad = int64 [2]: non-finite elements of v and of g. Non-finite
    terms are left out of the limbs; the caller turns a count > 0 into NaN sums, as the fast
    reduce pass's NaN would.
    """
    limbs = torch.zeros(6, NUM_LIMBS, dtype=torch.int64, device=v.device)
    bad = torch.zeros(2, dtype=torch.int64, device=v.device)
    rows = 6 if noise is not None else 3
    for start in range(0, v.numel(), EXACT_CHUNK):
        part = slice(start, start + EXACT_CHUNK)
        vc, gc = v[part].double(), g[part].double()
        bad[0] += (~torch.isfinite(vc)).sum()
        bad[1] += (~torch.isfinite(gc)).sum()
        factors = [(vc, vc), (gc, gc), (vc, gc)]
        if noise is not None:
            nc = noise[part].double()
            factors += [(nc, nc), (nc, vc), (nc, gc)]
        terms = torch.stack([a * b for a, b in factors])
        terms = torch.where(torch.isfinite(terms), terms, torch.zeros((), dtype=terms.dtype,
                                                                      device=terms.device))
        add_terms_(limbs[:rows], terms)
        carry_(limbs)
    return limbs, bad


def limbs_to_float(limbs: Tensor) -> list[float]:
    """Each row of int64 limbs [..., NUM_LIMBS] (host) as its correctly rounded float64 value."""
    rows = limbs.reshape(-1, NUM_LIMBS).tolist()
    out = []
    for row in rows:
        value = sum(int(limb) << (LIMB_BITS * k) for k, limb in enumerate(row))
        # int -> float rounds to nearest even; the power-of-two scale is exact (no subnormals
        # for any sum this sampler meets: the smallest nonzero sum here is >= 2**-298).
        out.append(math.ldexp(float(value), LSB_EXP))
    return out
