"""Plain-torch references of the two fused step kernels (the spec, the CPU path, the oracle).

Both operate on one 1-D contiguous shard of a parameter group; `offset` is the global element
index of the shard's first element within its group, so the noise (philox.py) does not depend on
how the group is sharded.

They are dtype-generic: with float64 state everything runs in float64 (the test oracle);
otherwise elementwise arithmetic is float32 and the sums are accumulated in float64.
Work is chunked over <= 2^20 elements so no full-size temporaries are created.

The "fp32-split" layout (rtllm.state.layouts) stores the fp32 position as two 16-bit planes: the high
half of each bit pattern, rounded half away from zero, is a bf16 (the weights the model computes
with, so no separate compute copy), and the low half is the signed int16 remainder. Joining them
gives the fp32 bits back exactly, so the chain is the fp32 chain (docs/precision.md).
"""

from __future__ import annotations

import torch

from .philox import check_noise_args, philox_normals

__all__ = ["reduce_sums_ref", "fused_update_ref_", "check_step_tensors", "check_coefficients", "check_precond",
           "SUM_NAMES", "split_fp32", "join_fp32"]

SUM_NAMES = ("vv", "gg", "vg", "nn", "nv", "ng")

_CHUNK = 1 << 20
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_vector(name: str, t, n: int | None, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, expected {n} (the length of v)")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of v)")


def split_fp32(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (bf16 high plane, int16 low plane) of the fp32-split layout; `join_fp32` inverts it.

    Integer arithmetic on the bit patterns, modulo 2^32, so it is a bijection for every pattern.
    """
    bits = value.view(torch.int32)
    hi = (bits + 0x8000) >> 16  # the high half, rounded half away from zero (sign-magnitude)
    return hi.to(torch.int16).view(torch.bfloat16), (bits - (hi << 16)).to(torch.int16)


def join_fp32(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The fp32 values of a split position (bf16 high plane, int16 low plane), bit-exact."""
    return ((hi.view(torch.int16).to(torch.int32) << 16) + lo.to(torch.int32)).view(torch.float32)


def check_step_tensors(
    x: torch.Tensor | None,
    v: torch.Tensor,
    g: torch.Tensor,
    compute: torch.Tensor | None,
    *,
    state_dtypes: tuple[torch.dtype, ...],
    grad_dtypes: tuple[torch.dtype, ...] = _FLOATS,
    compute_dtypes: tuple[torch.dtype, ...] = _FLOATS,
    x_lo: torch.Tensor | None = None,
) -> None:
    """Validate the tensors of a step: 1-D, contiguous, same length and device, allowed dtypes.

    With x_lo, (x, x_lo) is a split fp32 position: x bf16, x_lo int16, v fp32, no compute copy.
    """
    _check_vector("v", v, None, None)
    n, device = v.numel(), v.device
    if v.dtype not in state_dtypes:
        raise TypeError(f"v must have dtype in {state_dtypes}, got {v.dtype}")
    if x_lo is not None:
        if x is None:
            raise ValueError("x_lo (the low plane of a split position) needs x, its high plane")
        _check_vector("x_lo", x_lo, n, device)
        if (x.dtype, x_lo.dtype, v.dtype) != (torch.bfloat16, torch.int16, torch.float32):
            raise TypeError(f"a split position needs x bf16, x_lo int16 and v fp32, got "
                            f"{x.dtype}, {x_lo.dtype} and {v.dtype}")
        if compute is not None:
            raise ValueError("a split position's high plane is the compute copy: pass compute=None")
    if x is not None:
        _check_vector("x", x, n, device)
        if x_lo is None and x.dtype != v.dtype:
            raise TypeError(f"x must have the dtype of v ({v.dtype}), got {x.dtype}")
    _check_vector("g", g, n, device)
    if g.dtype not in grad_dtypes:
        raise TypeError(f"g must have dtype in {grad_dtypes}, got {g.dtype}")
    if compute is not None:
        _check_vector("compute", compute, n, device)
        if compute.dtype not in compute_dtypes:
            raise TypeError(f"compute must have dtype in {compute_dtypes}, got {compute.dtype}")


def check_coefficients(**coefficients: float) -> None:
    """The update scalars are host numbers (the float64 scalar rule's output), not tensors."""
    for name, c in coefficients.items():
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise TypeError(f"{name} must be a Python float, got {type(c).__name__}")


def check_precond(precond: torch.Tensor | None, v: torch.Tensor) -> None:
    """The optional drift preconditioner: fp32, 1-D, contiguous, the length and device of v."""
    if precond is None:
        return
    _check_vector("precond", precond, v.numel(), v.device)
    if precond.dtype != torch.float32:
        raise TypeError(f"precond must be float32, got {precond.dtype}")


def _compute_dtype(v: torch.Tensor) -> torch.dtype:
    return torch.float64 if v.dtype == torch.float64 else torch.float32


def reduce_sums_ref(
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    seed: int,
    step: int,
    stream: int,
    offset: int = 0,
    noise: bool = True,
) -> torch.Tensor:
    """(vv, gg, vg, nn, nv, ng) as a float64 tensor [6] on v's device; noise sums are 0 if not noise."""
    check_step_tensors(None, v, g, None, state_dtypes=(torch.float32, torch.float64))
    check_noise_args(seed, step, stream, offset)
    cd = _compute_dtype(v)
    sums = torch.zeros(6, dtype=torch.float64, device=v.device)
    for s in range(0, v.numel(), _CHUNK):
        e = min(s + _CHUNK, v.numel())
        vc, gc = v[s:e].to(cd), g[s:e].to(cd)
        terms = [vc * vc, gc * gc, vc * gc]
        if noise:
            nc = philox_normals(seed, step, stream, offset + s, e - s, device=v.device).to(cd)
            terms += [nc * nc, nc * vc, nc * gc]
        for k, t in enumerate(terms):
            sums[k] += torch.sum(t, dtype=torch.float64)
    return sums


def fused_update_ref_(
    x: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    compute: torch.Tensor | None = None,
    *,
    alpha: float,
    beta: float,
    gamma: float,
    delta: float,
    seed: int,
    step: int,
    stream: int,
    offset: int = 0,
    noise: bool = True,
    x_lo: torch.Tensor | None = None,
    precond: torch.Tensor | None = None,
) -> None:
    """In place: v <- alpha v + beta g + gamma n; x <- x + delta v; compute <- x (its dtype).

    With x_lo, (x, x_lo) is a split fp32 position (`split_fp32`): joined, updated in fp32 exactly
    as an fp32 x would be, and split again. With precond (fp32): x <- x + delta (v * precond).
    """
    check_step_tensors(x, v, g, compute, state_dtypes=(torch.float32, torch.float64), x_lo=x_lo)
    check_noise_args(seed, step, stream, offset)
    check_coefficients(alpha=alpha, beta=beta, gamma=gamma, delta=delta)
    check_precond(precond, v)
    cd = _compute_dtype(v)
    for s in range(0, v.numel(), _CHUNK):
        e = min(s + _CHUNK, v.numel())
        vc = alpha * v[s:e].to(cd) + beta * g[s:e].to(cd)
        if noise:
            nc = philox_normals(seed, step, stream, offset + s, e - s, device=v.device).to(cd)
            vc = vc + gamma * nc
        step_ = vc if precond is None else vc * precond[s:e].to(cd)
        xc = (x[s:e].to(cd) if x_lo is None else join_fp32(x[s:e], x_lo[s:e])) + delta * step_
        v[s:e].copy_(vc)
        if x_lo is None:
            x[s:e].copy_(xc)
        else:
            hi, lo = split_fp32(xc)
            x[s:e].copy_(hi)
            x_lo[s:e].copy_(lo)
        if compute is not None:
            compute[s:e].copy_(xc)  # round to nearest even in the compute dtype
