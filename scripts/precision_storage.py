"""Storage of the sampler state in the layouts of the precision study (docs/precision.md).

A kernel loads each stored vector, upcasts it to fp32, updates it in fp32 and stores it back
with its layout's rounding; `encode` is that store, `decode` that load:

- fp64: float64 (the reference run); fp32: fp32 (the library's default).
- fp32-split: the fp32 bit pattern as two 16-bit planes, the high one rounded half away from
  zero (so it is the bf16 compute copy), the low one the signed int16 remainder: bit-exact fp32
  (the library's own `split_fp32`, rtllm.state.layouts "fp32-split").
- pair-bf16 / pair-fp16: x = hi + lo, hi = bf16(x) (it *is* the compute copy), lo = x - hi
  rounded to bf16 / fp16 (Kahan-style compensation: the update reads hi + lo in fp32).
- bf16-sr: bf16 with stochastic rounding (16 random bits added below the bf16 mantissa of the
  fp32 result, then truncation; the bits come from a seeded torch generator, standing in for a
  Philox stream).
- bf16-rn: bf16 round-to-nearest, the negative control.

A layout name is "<x storage>" (v fp32; fp64 for fp64) or "<x storage>+<v storage>-v".
"""
from __future__ import annotations

import torch
from torch import Tensor

from rtllm.kernels.reference import join_fp32, split_fp32

STORAGE_BYTES = {"fp64": 8, "fp32": 4, "fp32-split": 4, "pair-bf16": 4, "pair-fp16": 4,
                 "bf16-sr": 2, "bf16-rn": 2}
# Order fixes each layout's seed (its index): append, never insert.
LAYOUTS = ["fp64", "fp32", "pair-bf16", "pair-fp16", "bf16-sr", "fp32+bf16-sr-v",
           "pair-bf16+bf16-sr-v", "bf16-sr+bf16-sr-v", "fp32+bf16-rn-v", "bf16-rn",
           "bf16-rn+bf16-rn-v", "fp32-split", "fp32-split+bf16-sr-v"]


def parse_layout(name: str) -> tuple[str, str]:
    """(x storage, v storage) of a layout name."""
    x, plus, v = name.partition("+")
    if plus and not v.endswith("-v"):
        v = ""  # invalid: the velocity part is spelled <storage>-v
    v = v.removesuffix("-v") if plus else ("fp64" if x == "fp64" else "fp32")
    if x not in STORAGE_BYTES or v not in STORAGE_BYTES:
        raise ValueError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    return x, v


def bytes_per_param(name: str) -> int:
    """Sampler state + bf16 gradient + bf16 compute copy (none when x's high part is bf16)."""
    x, v = parse_layout(name)
    compute_copy = 2 if x in ("fp64", "fp32") else 0  # the others' high part is bf16
    return STORAGE_BYTES[x] + STORAGE_BYTES[v] + 2 + compute_copy


# ------------------------------------------------------------------------------ storage
def stochastic_round_bf16(value: Tensor, gen: torch.Generator) -> Tensor:
    """fp32 -> bf16, rounding up in magnitude with probability (dropped bits) / 2^16.

    Adding 16 uniform bits below the bf16 mantissa and truncating is exactly that (the carry
    runs into the exponent when the mantissa overflows, as rounding up should).
    """
    bits = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, generator=gen)
    return ((value.view(torch.int32) + bits) & -65536).view(torch.float32).to(torch.bfloat16)


def encode(kind: str, value: Tensor, gen: torch.Generator) -> tuple[Tensor, ...]:
    """Store `value` (fp32, or float64 for fp64) in a storage kind: a tuple of tensors."""
    if kind == "fp64":
        return (value.double(),)
    value = value.float()
    if kind == "fp32":
        return (value,)
    if kind == "fp32-split":
        return split_fp32(value.contiguous())  # the library's own (rtllm.state.layouts "fp32-split")
    if kind.startswith("pair-"):
        hi = value.to(torch.bfloat16)
        # value - hi is exact in fp32 (hi is value rounded at a coarser bit); only lo rounds.
        lo = (value - hi.float()).to(torch.bfloat16 if kind == "pair-bf16" else torch.float16)
        return hi, lo
    if kind == "bf16-rn":
        return (value.to(torch.bfloat16),)
    if kind == "bf16-sr":
        return (stochastic_round_bf16(value, gen),)
    raise ValueError(f"unknown storage {kind!r}")


def decode(kind: str, parts: tuple[Tensor, ...]) -> Tensor:
    """The stored value as the kernel sees it after loading (fp32; float64 for fp64)."""
    if kind == "fp64":
        return parts[0]
    if kind == "fp32-split":
        return join_fp32(*parts)
    if kind.startswith("pair-"):
        return parts[0].float() + parts[1].float()  # rounds only lo's bits below fp32's resolution
    return parts[0].float()


def drift_speed(kind: str, *, n: int = 20_000, steps: int = 2_000, seed: int = 0) -> dict:
    """Realized over intended displacement after `steps` constant moves, per coordinate.

    Coordinates of magnitude 0.01-0.02 (LM weights), each with a fixed move of 0.3-2.3e-4 of
    itself per step: a round-to-nearest store loses a fixed fraction of every move wherever its
    grid is not much finer than the move, so the error does not average out along the drift.
    """
    gen = torch.Generator().manual_seed(seed)
    x0 = 0.01 + 0.01 * torch.rand(n, generator=gen)
    move = (1e-4 * x0 * (0.3 + 2 * torch.rand(n, generator=gen))).float()
    state = encode(kind, x0, gen)
    start = decode(kind, state).double()
    for _ in range(steps):
        state = encode(kind, decode(kind, state) + move, gen)
    ratio = (decode(kind, state).double() - start) / (steps * move.double())
    return {"mean": float(ratio.mean()), "sd": float(ratio.std()), "min": float(ratio.min()),
            "max": float(ratio.max())}
