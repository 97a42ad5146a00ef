"""Triton kernels of the two-pass step (algorithms.md section 2) and their launchers.

1. `reduce_sums`: read v, g, generate the noise n, return (vv, gg, vg, nn, nv, ng) in float64.
2. `fused_update_`: regenerate the same n, v <- alpha v + beta g + gamma n, x <- x + delta v,
   and write the low-precision compute copy of x; or, for a split fp32 position (x_lo given,
   reference.split_fp32), join its bf16 high and int16 low planes, update, split again.

References: `reference.py` (`reduce_sums_ref`, `fused_update_ref_`); noise: `philox.py`.

Layout: a program covers BLOCK consecutive *global* elements starting at a multiple of 4, i.e.
BLOCK/4 Philox quads. Philox runs once per quad; its four normals are interleaved back into
element order (4q + lane). Blocks are aligned to the global quad grid, not to the shard, so the
first block of a shard whose offset is not a multiple of 4 starts up to 3 elements early (masked).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import launch_mode
from .philox import check_noise_args
from .reference import check_coefficients, check_precond, check_step_tensors

__all__ = ["BLOCK", "reduce_sums", "fused_update_"]

BLOCK = 1024  # elements per program = 256 Philox quads; memory-bound, no autotune
_NUM_WARPS = 4
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Change from call to call (or shard to shard): never specialize on their values. The shard's
# offset is split into quad_base = offset // 4 (here) and the constexpr OFFSET_MOD = offset % 4,
# constant per shard: with OFFSET_MOD == 0 the element index is a known multiple of BLOCK plus
# arange, so 16-byte aligned shards get vector loads and stores (ld.global.v4).
_NOISE_ARGS = ["seed", "step", "stream", "quad_base"]


@triton.jit
def _pair_to_normal(u1, u2):
    """Box-Muller on two uniforms in [0, 1): r cos(2 pi u2), r sin(2 pi u2), r = sqrt(-2 ln u1).

    The angle is reduced exactly in the uniform's own units (4 u2 = quadrant k + f, |f| <= 1/2)
    and cos/sin of f pi/2 in [-pi/4, pi/4] are Cephes' float32 polynomials: no range reduction
    code and no libdevice sin/cos (most of the noise's instructions before). The torch oracle,
    philox._box_muller, computes the same float32 operations in the same order.
    """
    u1 = tl.maximum(u1, 1.0e-7)
    r = tl.sqrt(-2.0 * tl.log(u1))
    t = u2 * 4.0
    k = tl.floor(t + 0.5)
    a = (t - k) * 1.5707963267948966
    z = a * a
    sin_a = a + a * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
    cos_a = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5))
    q = k.to(tl.int32) & 3  # angle = q pi/2 + a
    odd = (q & 1) != 0
    c = tl.where(odd, sin_a, cos_a)
    s = tl.where(odd, cos_a, sin_a)
    c = tl.where((q == 1) | (q == 2), -c, c)
    s = tl.where(q >= 2, -s, s)
    return r * c, r * s


@triton.jit
def _normals_block(seed, step, stream, quad0, QUADS: tl.constexpr):
    """Normals for global elements 4*quad0 .. 4*quad0 + 4*QUADS - 1, in element order."""
    q = quad0 + tl.arange(0, QUADS).to(tl.int64)
    c0 = q.to(tl.uint32)  # truncates: low word
    c1 = (q >> 32).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + step.to(tl.uint32)
    c3 = zero + stream.to(tl.uint32)
    r0, r1, r2, r3 = tl.random.philox(seed, c0, c1, c2, c3)
    n0, n1 = _pair_to_normal(tl.random.uint_to_uniform_float(r0), tl.random.uint_to_uniform_float(r1))
    n2, n3 = _pair_to_normal(tl.random.uint_to_uniform_float(r2), tl.random.uint_to_uniform_float(r3))
    # interleave(a, b) = a0 b0 a1 b1 ...; twice gives n0_q n1_q n2_q n3_q for each quad q.
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit
def _block_index(quad_base, N, OFFSET_MOD: tl.constexpr, BLOCK: tl.constexpr):
    """Local indices of this program's elements, their mask, and the first quad index.

    The shard's offset is 4 * quad_base + OFFSET_MOD; local element i is global 4*quad_base + OFFSET_MOD + i.
    """
    pid = tl.program_id(0).to(tl.int64)
    quad0 = quad_base.to(tl.int64) + pid * (BLOCK // 4)
    idx = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64) - OFFSET_MOD  # int64: shards exceed 2^31
    if OFFSET_MOD == 0:
        mask = idx < N
    else:
        mask = (idx >= 0) & (idx < N)
    return idx, mask, quad0


@triton.jit(do_not_specialize=_NOISE_ARGS)
def _reduce_sums_kernel(
    v_ptr, g_ptr, part_ptr, N, seed, step, stream, quad_base,
    OFFSET_MOD: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    idx, mask, quad0 = _block_index(quad_base, N, OFFSET_MOD, BLOCK)
    v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    _store_sums(part_ptr, v, g, mask, seed, step, stream, quad0, NOISE, BLOCK)


@triton.jit
def _store_sums(part_ptr, v, g, mask, seed, step, stream, quad0, NOISE: tl.constexpr,
                BLOCK: tl.constexpr):
    """This program's row of fp32 partials (vv, gg, vg, nn, nv, ng); shared with triton_segments."""
    row = part_ptr + tl.program_id(0).to(tl.int64) * 6
    tl.store(row + 0, tl.sum(v * v, axis=0))
    tl.store(row + 1, tl.sum(g * g, axis=0))
    tl.store(row + 2, tl.sum(v * g, axis=0))
    if NOISE:
        n = _normals_block(seed, step, stream, quad0, BLOCK // 4)
        n = tl.where(mask, n, 0.0)
        tl.store(row + 3, tl.sum(n * n, axis=0))
        tl.store(row + 4, tl.sum(n * v, axis=0))
        tl.store(row + 5, tl.sum(n * g, axis=0))
    else:
        tl.store(row + 3, 0.0)
        tl.store(row + 4, 0.0)
        tl.store(row + 5, 0.0)


@triton.jit
def _ld(ptrs, mask, other, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=mask, other=other)
    else:
        return tl.load(ptrs)


@triton.jit
def _st(ptrs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value)


@triton.jit
def _update_block(x_ptr, lo_ptr, v_ptr, g_ptr, c_ptr, idx, mask, alpha, beta, gamma, delta, noise,
                  NOISE: tl.constexpr, HAS_COMPUTE: tl.constexpr, SPLIT: tl.constexpr,
                  MASKED: tl.constexpr, p_ptr, PRECOND: tl.constexpr):
    """The update of one block given its noise; MASKED False: every element is in the shard
    (no mask, so aligned blocks get vector accesses). PRECOND: the drift is scaled per element
    by the fp32 buffer at p_ptr (pSMILE's diagonal preconditioner). Shared with triton_segments."""
    if SPLIT:  # x_ptr: the high plane read as int16; the fp32 bits are hi * 2^16 + lo
        hi = _ld(x_ptr + idx, mask, 0, MASKED).to(tl.int32)
        lo = _ld(lo_ptr + idx, mask, 0, MASKED).to(tl.int32)
        x = ((hi << 16) + lo).to(tl.float32, bitcast=True)
    else:
        x = _ld(x_ptr + idx, mask, 0.0, MASKED).to(tl.float32)
    v = _ld(v_ptr + idx, mask, 0.0, MASKED).to(tl.float32)
    g = _ld(g_ptr + idx, mask, 0.0, MASKED).to(tl.float32)
    v = alpha * v + beta * g
    if NOISE:
        v += gamma * noise
    if PRECOND:
        x += delta * (v * _ld(p_ptr + idx, mask, 0.0, MASKED))
    else:
        x += delta * v
    _st(v_ptr + idx, v, mask, MASKED)
    if SPLIT:  # as reference.split_fp32: high half rounded half away from zero, signed remainder
        bits = x.to(tl.int32, bitcast=True)
        hi = (bits + 0x8000) >> 16
        _st(x_ptr + idx, hi.to(tl.int16), mask, MASKED)
        _st(lo_ptr + idx, (bits - (hi << 16)).to(tl.int16), mask, MASKED)
    else:
        _st(x_ptr + idx, x, mask, MASKED)
    if HAS_COMPUTE:
        _st(c_ptr + idx, x.to(c_ptr.dtype.element_ty), mask, MASKED)


@triton.jit(do_not_specialize=_NOISE_ARGS)
def _fused_update_kernel(
    x_ptr, lo_ptr, v_ptr, g_ptr, c_ptr, N, alpha, beta, gamma, delta, seed, step, stream, quad_base,
    OFFSET_MOD: tl.constexpr, NOISE: tl.constexpr, HAS_COMPUTE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK: tl.constexpr, p_ptr, PRECOND: tl.constexpr,
):
    idx, mask, quad0 = _block_index(quad_base, N, OFFSET_MOD, BLOCK)
    if NOISE:
        noise = _normals_block(seed, step, stream, quad0, BLOCK // 4)
    else:
        noise = tl.zeros([BLOCK], dtype=tl.float32)
    _update_block(x_ptr, lo_ptr, v_ptr, g_ptr, c_ptr, idx, mask, alpha, beta, gamma, delta, noise,
                  NOISE, HAS_COMPUTE, SPLIT, True, p_ptr, PRECOND)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def _check_device(v: torch.Tensor) -> None:
    if v.device.type != "cuda" and not _interpreting() and not launch_mode.compile_only_active():
        raise ValueError(
            f"the Triton kernels need CUDA tensors (got {v.device}); use the *_ref functions "
            "or set TRITON_INTERPRET=1 before importing triton"
        )


def _grid(n: int, offset: int) -> tuple[int]:
    return (triton.cdiv(n + offset % 4, BLOCK),)


def reduce_sums(
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    seed: int,
    step: int,
    stream: int,
    offset: int = 0,
    noise: bool = True,
) -> torch.Tensor:
    """(vv, gg, vg, nn, nv, ng): float64 tensor [6] on v's device, no host sync.

    Deterministic: fp32 per-block partials, summed in float64 by torch in a fixed order.
    """
    check_step_tensors(None, v, g, None, state_dtypes=(torch.float32,), grad_dtypes=_GRAD_DTYPES)
    check_noise_args(seed, step, stream, offset)
    _check_device(v)
    n = v.numel()
    if n == 0:
        return torch.zeros(6, dtype=torch.float64, device=v.device)
    grid = _grid(n, offset)
    partials = torch.empty((grid[0], 6), dtype=torch.float32, device=v.device)
    _reduce_sums_kernel[grid](
        v, g, partials, n, seed, step & 0xFFFFFFFF, stream, offset // 4,
        OFFSET_MOD=offset % 4, NOISE=bool(noise), BLOCK=BLOCK, num_warps=_NUM_WARPS,
    )
    return torch.sum(partials, dim=0, dtype=torch.float64)


def fused_update_(
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
    """In place: v <- alpha v + beta g + gamma n; x <- x + delta v; compute <- x in its dtype.

    Arithmetic in fp32 (coefficients rounded to fp32); the compute copy is rounded from fp32 x.
    With x_lo, (x, x_lo) is a split fp32 position (bf16 high plane, int16 low plane).
    With precond (fp32, the length of v): x <- x + delta (v * precond) instead.
    """
    check_step_tensors(
        x, v, g, compute, state_dtypes=(torch.float32,),
        grad_dtypes=_GRAD_DTYPES, compute_dtypes=_COMPUTE_DTYPES, x_lo=x_lo,
    )
    check_noise_args(seed, step, stream, offset)
    check_coefficients(alpha=alpha, beta=beta, gamma=gamma, delta=delta)
    check_precond(precond, v)
    _check_device(v)
    n = v.numel()
    if n == 0:
        return
    split = x_lo is not None
    _fused_update_kernel[_grid(n, offset)](
        x.view(torch.int16) if split else x, x_lo if split else x, v, g,
        x if compute is None else compute, n,
        float(alpha), float(beta), float(gamma), float(delta),
        seed, step & 0xFFFFFFFF, stream, offset // 4, OFFSET_MOD=offset % 4,
        NOISE=bool(noise), HAS_COMPUTE=compute is not None, SPLIT=split, BLOCK=BLOCK,
        p_ptr=v if precond is None else precond, PRECOND=precond is not None, num_warps=_NUM_WARPS,
    )
