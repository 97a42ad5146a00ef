"""The noise stream in plain torch: the oracle for the Triton kernels.

Noise is a pure function of (seed, step, stream, e), e the global element index in a parameter
group. Element e = 4*q + lane reads lane `lane` of one Philox4x32-10 evaluation with

    counter = (q & 0xffffffff, q >> 32, step & 0xffffffff, stream & 0xffffffff)
    key     = (seed & 0xffffffff, (seed >> 32) & 0xffffffff)

turned into uniforms exactly as Triton's `tl.random` does (`uint_to_uniform_float`), then into
normals by Box-Muller on the pairs (u0, u1) and (u2, u3) as the kernels compute it
(triton_step._pair_to_normal: cos/sin by polynomials after an exact quadrant reduction, not
libdevice's sin/cos). So `tl.random.philox(seed, c0, c1, c2, c3)` in a kernel and
`philox_normals` here give the same bits, and the same normals up to the rounding of log and
sqrt (and fused multiply-adds on a GPU). Its bits coincide with `tl.randn4x(seed, q)` at step 0 /
stream 0; its normals with randn4x's to within the rounding of randn4x's angle (float32 2 pi u).

Torch has no uint32, so the words live in int64 tensors holding values in [0, 2^32).
"""

from __future__ import annotations

import torch

__all__ = ["STREAM_INIT", "STREAM_REFRESH", "philox_normals", "philox_uint32x4", "uint32_to_uniform"]

STREAM_INIT = 0  # initial velocity
STREAM_REFRESH = 1  # momentum refresh

# Constants of Triton's philox_impl (32-bit variant), 10 rounds.
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_N_ROUNDS = 10
_M32 = 0xFFFFFFFF

# At most this many quads (4 elements) per chunk: bounds the int64 temporaries (~10 x 2 MiB).
_CHUNK_QUADS = 1 << 18


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a*b >> 32, a*b & 0xffffffff) for a constant a and b in [0, 2^32), without int64 overflow.

    a*b can reach 2^64, so b is split into 16-bit halves: a*b_hi and a*b_lo stay below 2^48.
    """
    b_hi = b >> 16
    b_lo = b & 0xFFFF
    p_hi = a * b_hi  # < 2^48, weight 2^16
    p_lo = a * b_lo  # < 2^48, weight 1
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox_uint32x4(
    seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 words; same rounds as Triton's philox_impl."""
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def uint32_to_uniform(r: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for 32-bit words: float32 in [0, 1).

    Triton bitcasts to int32, maps x < 0 to ~x (i.e. r >= 2^31 to r ^ 0xffffffff), converts to
    float32 (rounding) and multiplies by the float32 constant 4.6566127342e-10.
    """
    x = torch.where(r >= (1 << 31), r ^ _M32, r)
    scale = torch.tensor(4.6566127342e-10, dtype=torch.float32, device=r.device)
    return x.to(torch.float32) * scale


_F32 = lambda value, like: torch.tensor(value, dtype=torch.float32, device=like.device)  # noqa: E731
_SIN = (-1.6666654611e-1, 8.3321608736e-3, -1.9515295891e-4)  # Cephes sinf on [-pi/4, pi/4]
_COS = (4.166664568298827e-2, -1.388731625493765e-3, 2.443315711809948e-5)  # Cephes cosf


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' Box-Muller (triton_step._pair_to_normal), float32 op for op.

    r = sqrt(-2 ln u1); the angle 2 pi u2 reduced exactly in units of the uniform (4 u2 =
    quadrant k + f), cos/sin of f pi/2 by Cephes' float32 polynomials on [-pi/4, pi/4].
    """
    c = lambda v: _F32(v, u1)  # noqa: E731
    u1 = torch.clamp_min(u1, 1.0e-7)
    r = torch.sqrt(c(-2.0) * torch.log(u1))
    t = u2 * c(4.0)
    k = torch.floor(t + c(0.5))
    a = (t - k) * c(1.5707963267948966)
    z = a * a
    sin_a = a + a * z * (c(_SIN[0]) + z * (c(_SIN[1]) + z * c(_SIN[2])))
    cos_a = c(1.0) - c(0.5) * z + z * z * (c(_COS[0]) + z * (c(_COS[1]) + z * c(_COS[2])))
    q = k.to(torch.int32) & 3  # angle = q pi/2 + a
    odd = (q & 1) != 0
    cos_t = torch.where(odd, sin_a, cos_a)
    sin_t = torch.where(odd, cos_a, sin_a)
    cos_t = torch.where((q == 1) | (q == 2), -cos_t, cos_t)
    sin_t = torch.where(q >= 2, -sin_t, sin_t)
    return r * cos_t, r * sin_t


def _check_int(name: str, value: int, bits: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name} must be in [0, 2^{bits}), got {value}")


def check_noise_args(seed: int, step: int, stream: int, offset: int, offset_name: str = "offset") -> None:
    """Validate the noise coordinates shared by the references and the kernels.

    seed is a 64-bit key, stream a 32-bit counter word; step is any non-negative int and wraps
    modulo 2^32 (the counter word holds step & 0xffffffff); offset is a global element index.
    """
    _check_int("seed", seed, 64)
    _check_int("step", step, 64)
    _check_int("stream", stream, 32)
    _check_int(offset_name, offset, 62)


def philox_normals(
    seed: int, step: int, stream: int, start: int, count: int, device=None
) -> torch.Tensor:
    """Standard normals (float32, shape [count]) for global elements start .. start+count-1."""
    check_noise_args(seed, step, stream, start, "start")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    out = torch.empty(count, dtype=torch.float32, device=device)
    if count == 0:
        return out
    step32 = step & _M32
    q_first = start // 4
    q_end = (start + count - 1) // 4 + 1
    for q0 in range(q_first, q_end, _CHUNK_QUADS):
        q1 = min(q0 + _CHUNK_QUADS, q_end)
        q = torch.arange(q0, q1, dtype=torch.int64, device=out.device)
        c0 = q & _M32
        c1 = q >> 32
        c2 = torch.full_like(q, step32)
        c3 = torch.full_like(q, stream)
        r0, r1, r2, r3 = philox_uint32x4(seed, c0, c1, c2, c3)
        n0, n1 = _box_muller(uint32_to_uniform(r0), uint32_to_uniform(r1))
        n2, n3 = _box_muller(uint32_to_uniform(r2), uint32_to_uniform(r3))
        block = torch.stack((n0, n1, n2, n3), dim=1).reshape(-1)  # element 4q + lane
        # Global elements covered by this chunk, clipped to [start, start + count).
        e_lo = max(4 * q0, start)
        e_hi = min(4 * q1, start + count)
        out[e_lo - start : e_hi - start] = block[e_lo - 4 * q0 : e_hi - 4 * q0]
    return out
