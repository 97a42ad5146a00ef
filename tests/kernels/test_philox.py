"""The torch noise stream (rtllm.kernels.philox) against Triton's own Philox, and its statistics."""

import math

import pytest
import torch

import rtllm.kernels.philox as philox
from rtllm.kernels.philox import STREAM_INIT, STREAM_REFRESH, philox_normals

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M32 = 0xFFFFFFFF

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from rtllm.kernels.triton_step import _pair_to_normal  # noqa: E402


@triton.jit
def _philox_probe_kernel(bits_ptr, unif_ptr, norm_ptr, seed, step, stream, q0, QUADS: tl.constexpr):
    """Triton's philox + uint_to_uniform_float + the kernels' Box-Muller, at element 4q + lane."""
    q = q0 + tl.arange(0, QUADS).to(tl.int64)
    c0 = q.to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.random.philox(
        seed, c0, (q >> 32).to(tl.uint32), zero + step.to(tl.uint32), zero + stream.to(tl.uint32)
    )
    u0 = tl.random.uint_to_uniform_float(r0)
    u1 = tl.random.uint_to_uniform_float(r1)
    u2 = tl.random.uint_to_uniform_float(r2)
    u3 = tl.random.uint_to_uniform_float(r3)
    n0, n1 = _pair_to_normal(u0, u1)
    n2, n3 = _pair_to_normal(u2, u3)
    i = 4 * tl.arange(0, QUADS)
    tl.store(bits_ptr + i + 0, r0.to(tl.int64))
    tl.store(bits_ptr + i + 1, r1.to(tl.int64))
    tl.store(bits_ptr + i + 2, r2.to(tl.int64))
    tl.store(bits_ptr + i + 3, r3.to(tl.int64))
    tl.store(unif_ptr + i + 0, u0)
    tl.store(unif_ptr + i + 1, u1)
    tl.store(unif_ptr + i + 2, u2)
    tl.store(unif_ptr + i + 3, u3)
    tl.store(norm_ptr + i + 0, n0)
    tl.store(norm_ptr + i + 1, n1)
    tl.store(norm_ptr + i + 2, n2)
    tl.store(norm_ptr + i + 3, n3)


@triton.jit
def _randn4x_kernel(out_ptr, seed, q0, QUADS: tl.constexpr):
    q = q0 + tl.arange(0, QUADS).to(tl.int64)
    n0, n1, n2, n3 = tl.randn4x(seed, q)
    i = 4 * tl.arange(0, QUADS)
    tl.store(out_ptr + i + 0, n0)
    tl.store(out_ptr + i + 1, n1)
    tl.store(out_ptr + i + 2, n2)
    tl.store(out_ptr + i + 3, n3)


# (seed, step, stream, first quad): small, 64-bit seed with the top bit set, 32-bit words at
# their maximum, quads past 2^31 and 2^32 (start element near 2^33 and beyond).
CASES = [
    (1234, 7, STREAM_REFRESH, 0),
    (0, 0, STREAM_INIT, 0),
    (2**63 + 5, 2**32 - 1, 2**32 - 1, 2**31 - 9),
    (0xDEADBEEF12345678, 2**31 + 1, 3, 2**33 + 3),
]


@pytest.mark.parametrize("seed,step,stream,q0", CASES)
def test_matches_triton_philox(seed, step, stream, q0):
    quads = 64
    bits = torch.zeros(4 * quads, dtype=torch.int64, device=DEVICE)
    unif = torch.zeros(4 * quads, dtype=torch.float32, device=DEVICE)
    norm = torch.zeros(4 * quads, dtype=torch.float32, device=DEVICE)
    _philox_probe_kernel[(1,)](bits, unif, norm, seed, step, stream, q0, QUADS=quads)
    bits &= M32  # the uint32 -> int64 cast may sign-extend; keep the 32-bit word

    q = torch.arange(q0, q0 + quads, dtype=torch.int64, device=DEVICE)
    words = philox.philox_uint32x4(
        seed, q & M32, q >> 32, torch.full_like(q, step & M32), torch.full_like(q, stream)
    )
    ours_bits = torch.stack(words, dim=1).reshape(-1)
    assert torch.equal(ours_bits, bits)
    assert torch.equal(philox.uint32_to_uniform(ours_bits), unif)
    # log and sqrt are different implementations (numpy or libdevice vs torch), and a GPU fuses
    # multiply-adds: ~1 ulp apart.
    ours = philox_normals(seed, step, stream, 4 * q0, 4 * quads, device=DEVICE)
    torch.testing.assert_close(ours, norm, rtol=1e-6, atol=1e-6)


def test_step0_stream0_is_randn4x():
    # The same Philox bits and uniforms; randn4x rounds its angle 2 pi u to float32 and takes
    # libdevice's cos/sin of it, the kernels reduce the angle exactly: within 1e-6 of each other.
    quads, seed, q0 = 64, 987654321, 2**32 - 7
    out = torch.zeros(4 * quads, dtype=torch.float32, device=DEVICE)
    _randn4x_kernel[(1,)](out, seed, q0, QUADS=quads)
    ours = philox_normals(seed, 0, 0, 4 * q0, 4 * quads, device=DEVICE)
    torch.testing.assert_close(ours, out, rtol=1e-6, atol=1e-6)


def test_uniform_edges():
    r = torch.tensor([0, 1, 2**31 - 1, 2**31, M32], dtype=torch.int64)
    u = philox.uint32_to_uniform(r)
    assert u.dtype == torch.float32
    assert u[0] == 0 and u[4] == 0  # 0xffffffff -> ~(-1) = 0
    assert (u >= 0).all() and (u < 1).all()


@pytest.mark.parametrize("start", [0, 3, 2**33 - 5])
@pytest.mark.parametrize("chunk_quads", [3, 1 << 18])
def test_slicing_invariance(monkeypatch, start, chunk_quads):
    """philox_normals(s, t, k, a, n)[i] == philox_normals(s, t, k, base, big)[a - base + i]."""
    monkeypatch.setattr(philox, "_CHUNK_QUADS", chunk_quads)  # 3 quads: many chunk boundaries
    base = start - start % 8 - 8
    base = max(base, 0)
    whole = philox_normals(11, 5, 1, base, 200)
    for a, n in [(start, 1), (start, 17), (start + 1, 30), (start + 2, 3), (start + 5, 100)]:
        part = philox_normals(11, 5, 1, a, n)
        assert part.shape == (n,)
        assert torch.equal(part, whole[a - base : a - base + n]), (a, n)


def test_empty_and_validation():
    assert philox_normals(1, 2, 3, 10, 0).shape == (0,)
    with pytest.raises(ValueError, match="seed"):
        philox_normals(-1, 0, 0, 0, 4)
    with pytest.raises(ValueError, match="stream"):
        philox_normals(1, 0, 2**32, 0, 4)
    with pytest.raises(ValueError, match="start"):
        philox_normals(1, 0, 0, -4, 4)
    with pytest.raises(TypeError, match="step"):
        philox_normals(1, 1.0, 0, 0, 4)
    with pytest.raises(ValueError, match="count"):
        philox_normals(1, 0, 0, 0, -1)


def test_step_wraps_at_32_bits():
    assert torch.equal(philox_normals(1, 5, 0, 0, 8), philox_normals(1, 5 + 2**32, 0, 0, 8))


def test_coordinates_give_different_noise():
    n = 4096
    ref = philox_normals(7, 3, STREAM_REFRESH, 0, n)
    others = [
        philox_normals(8, 3, STREAM_REFRESH, 0, n),  # seed (low word)
        philox_normals(7 + 2**32, 3, STREAM_REFRESH, 0, n),  # seed (high word)
        philox_normals(7, 4, STREAM_REFRESH, 0, n),  # step
        philox_normals(7, 3, STREAM_INIT, 0, n),  # stream
        philox_normals(7, 3, STREAM_REFRESH, 2**34, n),  # element index (high counter word)
        philox_normals(7, 3, STREAM_REFRESH, n, n),  # element index (low counter word)
    ]
    for other in others:
        assert (other == ref).float().mean() < 0.01
        # Independent N(0,1) vectors: corr ~ N(0, 1/n), sigma = 1/64; threshold 5 sigma.
        assert abs(torch.corrcoef(torch.stack([ref, other]))[0, 1]) < 5 / n**0.5


def test_moments():
    n = 100_000
    z = philox_normals(2024, 1, STREAM_REFRESH, 12345, n).double()
    # mean: sigma = 1/sqrt(n) = 3.2e-3; threshold 5 sigma = 0.016.
    assert abs(z.mean()) < 5 / n**0.5
    # variance: sigma = sqrt(2/n) = 4.5e-3; threshold 5 sigma = 0.022.
    assert abs(z.var() - 1) < 5 * (2 / n) ** 0.5
    # fourth moment E z^4 = 3, sd sqrt(96/n) = 0.031; threshold 5 sigma = 0.155.
    assert abs((z**4).mean() - 3) < 5 * (96 / n) ** 0.5
    # lag-1..4 correlations (lanes of one quad share a Philox call; Box-Muller pairs share u's):
    # each ~ N(0, 1/n), sigma = 3.2e-3; threshold 5 sigma.
    for lag in range(1, 5):
        c = (z[:-lag] * z[lag:]).mean()
        assert abs(c) < 5 / n**0.5, lag


def _float64_box_muller(u1, u2):
    u1 = torch.clamp_min(u1.double(), 1.0e-7)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(2 * math.pi * u2.double()), r * torch.sin(2 * math.pi * u2.double())


def test_box_muller_within_6e7_of_float64():
    """The polynomial cos/sin after the exact quadrant reduction, against float64 on the same
    uniforms: max abs error 5.2e-7 over 2^19 normals (Triton's pair_uniform_to_normal, float32
    2 pi u then cos/sin: 1.6e-6), and exact signs and swaps at the quadrant edges."""
    q = torch.arange(1 << 17, dtype=torch.int64)
    words = philox.philox_uint32x4(99, q & M32, q >> 32, torch.full_like(q, 5), torch.full_like(q, 1))
    u = [philox.uint32_to_uniform(w) for w in words]
    edges = torch.tensor([0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1 - 2**-24, 2**-24])
    u1 = torch.cat([u[0], u[2], torch.full_like(edges, 0.3)])
    u2 = torch.cat([u[1], u[3], edges])
    for got, want in zip(philox._box_muller(u1, u2), _float64_box_muller(u1, u2)):
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max() < 6e-7


def test_a_million_normals_are_standard_normal():
    """Mean, variance and the Kolmogorov-Smirnov distance of 1e6 draws against N(0, 1)."""
    n = 1_000_000
    z = philox_normals(31337, 9, STREAM_REFRESH, 2**32 - 3, n).double()
    assert abs(z.mean()) < 5 / n**0.5  # sigma 1e-3
    assert abs(z.var() - 1) < 5 * (2 / n) ** 0.5  # sigma 1.4e-3
    z, _ = torch.sort(z)
    cdf = torch.special.ndtr(z)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 1.95 / n**0.5, ks  # the KS test's critical value at p = 0.001
