"""Plain-torch references of the two fused step kernels (the spec, the CPU path, the oracle).

Both operate on one 1-D contiguous shard of a parameter group; `offset` is the global element
index of the shard's first element within its group, so the noise (philox.py) does not depend on
how the group is sharded.

They are dtype-generic: with float64 state everything runs in float64 (the test oracle);
otherwise elementwise arithmetic is float32 and the sums are accumulated in float64.
Work is chunked over <= 2^20 elements so no full-size temporaries are created.
"""

from __future__ import annotations

import torch

from .philox import check_noise_args, philox_normals

__all__ = ["reduce_sums_ref", "fused_update_ref_", "check_step_tensors", "check_coefficients", "SUM_NAMES"]

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


def check_step_tensors(
    x: torch.Tensor | None,
    v: torch.Tensor,
    g: torch.Tensor,
    compute: torch.Tensor | None,
    *,
    state_dtypes: tuple[torch.dtype, ...],
    grad_dtypes: tuple[torch.dtype, ...] = _FLOATS,
    compute_dtypes: tuple[torch.dtype, ...] = _FLOATS,
) -> None:
    """Validate the tensors of a step: 1-D, contiguous, same length and device, allowed dtypes."""
    _check_vector("v", v, None, None)
    n, device = v.numel(), v.device
    if v.dtype not in state_dtypes:
        raise TypeError(f"v must have dtype in {state_dtypes}, got {v.dtype}")
    if x is not None:
        _check_vector("x", x, n, device)
        if x.dtype != v.dtype:
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
) -> None:
    """In place: v <- alpha v + beta g + gamma n; x <- x + delta v; compute <- x (its dtype)."""
    check_step_tensors(x, v, g, compute, state_dtypes=(torch.float32, torch.float64))
    check_noise_args(seed, step, stream, offset)
    check_coefficients(alpha=alpha, beta=beta, gamma=gamma, delta=delta)
    cd = _compute_dtype(v)
    for s in range(0, v.numel(), _CHUNK):
        e = min(s + _CHUNK, v.numel())
        vc = alpha * v[s:e].to(cd) + beta * g[s:e].to(cd)
        if noise:
            nc = philox_normals(seed, step, stream, offset + s, e - s, device=v.device).to(cd)
            vc = vc + gamma * nc
        xc = x[s:e].to(cd) + delta * vc
        v[s:e].copy_(vc)
        x[s:e].copy_(xc)
        if compute is not None:
            compute[s:e].copy_(xc)  # round to nearest even in the compute dtype
