"""Triton step kernels (under TRITON_INTERPRET=1 on CPU) against the float64 torch references."""

import pytest
import torch

from rtllm.kernels.philox import STREAM_REFRESH, philox_normals
from rtllm.kernels.reference import fused_update_ref_, reduce_sums_ref

pytest.importorskip("triton")
from rtllm.kernels.triton_step import BLOCK, fused_update_, reduce_sums  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [1, 17, 1023, 1025, 4097]
NOISE = dict(seed=0x5EED_0000_1234, step=41, stream=STREAM_REFRESH)
COEF = dict(alpha=0.93, beta=-0.37, gamma=0.21, delta=0.05)
SUM_RTOL = 1e-5  # of the scale sum |terms| (fp32 products, fp32 block partials of BLOCK terms)
UPD_RTOL = 1e-6  # of the elementwise scale |alpha v| + |beta g| + |gamma| max(|n|, 1)


def make(n, g_dtype=torch.float32, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = (0.02 * torch.randn(n, generator=gen)).to(device)
    v = torch.randn(n, generator=gen).to(device)
    g = (3.0 * torch.randn(n, generator=gen)).to(device=device, dtype=g_dtype)
    return x, v, g


def sum_scale(v, g, n):
    v, g, n = v.double(), g.double(), n.double()
    terms = [v * v, g * g, v * g, n * n, n * v, n * g]
    return torch.stack([t.abs().sum() for t in terms])


def assert_sums_close(got, ref, scale):
    assert got.dtype == torch.float64 and got.shape == (6,)
    err = (got - ref).abs()
    assert (err <= SUM_RTOL * scale + 1e-30).all(), (got, ref, err / scale)


def run_both(n, g_dtype, c_dtype, noise, offset=0, **kw):
    """Update with the kernel (fp32) and the reference (float64); return both states."""
    x, v, g = make(n, g_dtype)
    coef = {**COEF, **kw}
    xr, vr = x.double(), v.double()
    cr = None if c_dtype is None else torch.empty(n, dtype=c_dtype, device=DEVICE)
    fused_update_ref_(xr, vr, g, cr, **coef, **NOISE, offset=offset, noise=noise)
    c = None if c_dtype is None else torch.full((n,), float("nan"), dtype=c_dtype, device=DEVICE)
    nn = philox_normals(**NOISE, start=offset, count=n, device=DEVICE).double() if noise else 0 * vr
    scale_v = (coef["alpha"] * v.double()).abs() + (coef["beta"] * g.double()).abs()
    scale_v += abs(coef["gamma"]) * nn.abs().clamp_min(1.0) if noise else 0
    scale_x = x.double().abs() + abs(coef["delta"]) * scale_v
    ptrs = (x.data_ptr(), v.data_ptr(), g.data_ptr())
    assert fused_update_(x, v, g, c, **coef, **NOISE, offset=offset, noise=noise) is None
    assert (x.data_ptr(), v.data_ptr(), g.data_ptr()) == ptrs  # in place
    return (x, v, c), (xr, vr, cr), (scale_x, scale_v)


def bf16_ulp(t):
    _, e = torch.frexp(t.double())  # t = m 2^e, m in [0.5, 1): bf16 ulp = 2^(e - 8)
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), e - 8)


# ---------------------------------------------------------------- reduce


@pytest.mark.parametrize("noise", [True, False])
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", SIZES)
def test_reduce_matches_reference(n, g_dtype, noise):
    _, v, g = make(n, g_dtype)
    got = reduce_sums(v, g, **NOISE, noise=noise)
    assert got.device == v.device
    ref = reduce_sums_ref(v.double(), g, **NOISE, noise=noise)
    nn = philox_normals(**NOISE, start=0, count=n, device=DEVICE)
    assert_sums_close(got, ref, sum_scale(v, g, nn))
    if not noise:
        assert (got[3:] == 0).all()
    assert torch.equal(got, reduce_sums(v, g, **NOISE, noise=noise))  # deterministic


@pytest.mark.parametrize("offset", [0, 1, 3, 2**33 + 2])
@pytest.mark.parametrize("n", SIZES)
def test_reduce_counts_every_element(n, offset):
    ones = torch.ones(n, device=DEVICE)
    got = reduce_sums(ones, ones.bfloat16(), **NOISE, offset=offset, noise=False)
    assert got.tolist() == [n, n, n, 0, 0, 0]  # integer sums: exact in fp32 and float64


# ---------------------------------------------------------------- update


@pytest.mark.parametrize("noise", [True, False])
@pytest.mark.parametrize("c_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", SIZES)
def test_update_matches_reference(n, g_dtype, c_dtype, noise):
    (x, v, c), (xr, vr, _), (sx, sv) = run_both(n, g_dtype, c_dtype, noise)
    assert ((v.double() - vr).abs() <= UPD_RTOL * sv).all()
    assert ((x.double() - xr).abs() <= UPD_RTOL * sx).all()
    if c_dtype is torch.float32:
        assert torch.equal(c, x)
    elif c_dtype is torch.bfloat16:
        assert not c.isnan().any()  # every element written
        # Within one bf16 ulp of the float64 x (GPU rounds to nearest, the interpreter truncates).
        assert ((c.double() - xr).abs() <= bf16_ulp(xr) + UPD_RTOL * sx).all()


def test_update_fp16_compute_and_large_offset():
    (x, v, c), (xr, vr, cr), (sx, sv) = run_both(1025, torch.float16, torch.float16, True, 2**33 + 3)
    assert ((v.double() - vr).abs() <= UPD_RTOL * sv).all()
    assert ((x.double() - xr).abs() <= UPD_RTOL * sx).all()
    assert torch.equal(c, x.half())  # fp16 rounding is to nearest even in both


@pytest.mark.parametrize("offset", [0, 2, 2**33 + 1])
def test_update_noise_is_philox_normals(offset):
    """alpha = beta = delta = 0, gamma = 1 leaves v = n: the kernel's noise, element by element."""
    n = 1031
    x, v, g = make(n)
    fused_update_(x, v, g, alpha=0.0, beta=0.0, gamma=1.0, delta=0.0, **NOISE, offset=offset)
    ref = philox_normals(**NOISE, start=offset, count=n, device=DEVICE)
    torch.testing.assert_close(v, ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- sharding

GROUP = 5000
CUTS = [0, 1, 18, 1041, 2066, 3090, GROUP]  # shards of 1, 17, 1023, 1025, 1024, 1910 elements


def test_reduce_sharding_invariance():
    _, v, g = make(GROUP, torch.bfloat16)
    whole = reduce_sums(v, g, **NOISE)
    parts = sum(
        reduce_sums(v[a:b], g[a:b], **NOISE, offset=a) for a, b in zip(CUTS[:-1], CUTS[1:])
    )
    nn = philox_normals(**NOISE, start=0, count=GROUP, device=DEVICE)
    assert_sums_close(parts, whole, sum_scale(v, g, nn))


def test_update_sharding_invariance():
    x, v, g = make(GROUP, torch.bfloat16)
    xs, vs = x.clone(), v.clone()
    c = torch.empty(GROUP, dtype=torch.bfloat16, device=DEVICE)
    cs = torch.full_like(c, float("nan"))
    fused_update_(x, v, g, c, **COEF, **NOISE)
    for a, b in zip(CUTS[:-1], CUTS[1:]):
        fused_update_(xs[a:b], vs[a:b], g[a:b], cs[a:b], **COEF, **NOISE, offset=a)
    # Same element, same inputs, same noise bits, same arithmetic: bit-identical.
    assert torch.equal(vs, v) and torch.equal(xs, x) and torch.equal(cs, c)


# ---------------------------------------------------------------- edges and validation


def test_empty():
    e = torch.empty(0, device=DEVICE)
    assert torch.equal(reduce_sums(e, e, **NOISE), torch.zeros(6, dtype=torch.float64, device=DEVICE))
    fused_update_(e, e.clone(), e, e.bfloat16(), **COEF, **NOISE)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_validation(impl):
    upd = fused_update_ if impl == "triton" else fused_update_ref_
    red = reduce_sums if impl == "triton" else reduce_sums_ref
    x, v, g = make(16)
    with pytest.raises(TypeError, match="v must"):
        red(v.bfloat16(), g, **NOISE)
    with pytest.raises(ValueError, match="g has"):
        red(v, g[:8], **NOISE)
    with pytest.raises(ValueError, match="v must be 1-D"):
        red(v.view(4, 4), g, **NOISE)
    with pytest.raises(ValueError, match="x must be contiguous"):
        upd(torch.zeros(32, device=DEVICE)[::2], v, g, **COEF, **NOISE)
    with pytest.raises(TypeError, match="x must have the dtype"):
        upd(x.half(), v, g, **COEF, **NOISE)
    with pytest.raises(TypeError, match="compute"):
        upd(x, v, g, torch.zeros(16, dtype=torch.int32, device=DEVICE), **COEF, **NOISE)
    with pytest.raises(TypeError, match="g must"):
        upd(x, v, g.int(), **COEF, **NOISE)
    with pytest.raises(ValueError, match="offset"):
        red(v, g, **NOISE, offset=-1)
    with pytest.raises(TypeError, match="alpha"):
        upd(x, v, g, **{**COEF, "alpha": torch.tensor(1.0)}, **NOISE)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="compute is on"):
            upd(x, v, g, torch.zeros(16, device="meta"), **COEF, **NOISE)


def test_block_is_whole_quads():
    assert BLOCK % 4 == 0 and BLOCK & (BLOCK - 1) == 0


# ---------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_large():
    n, offset = 10_000_003, 2**33 + 1
    x, v, g = make(n, torch.bfloat16, device="cuda")
    got = reduce_sums(v, g, **NOISE, offset=offset)
    ref = reduce_sums_ref(v.double(), g, **NOISE, offset=offset)
    nn = philox_normals(**NOISE, start=offset, count=n, device="cuda")
    assert_sums_close(got, ref, sum_scale(v, g, nn))

    (x, v, c), (xr, vr, _), (sx, sv) = run_both(n, torch.bfloat16, torch.bfloat16, True, offset)
    assert ((v.double() - vr).abs() <= UPD_RTOL * sv).all()
    assert ((x.double() - xr).abs() <= UPD_RTOL * sx).all()
    assert torch.equal(c, x.bfloat16())  # on GPU the cast rounds to nearest even, like torch


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("n", [17, 1025])
def test_update_with_preconditioner_matches_reference(n, split):
    """pSMILE's drift x <- x + delta (v * p): the kernel against the float64 reference, and the
    preconditioner p = 1 equal to no preconditioner bit for bit."""
    from rtllm.kernels.reference import join_fp32, split_fp32

    x, v, g = make(n, torch.bfloat16)
    p = torch.rand(n, generator=torch.Generator().manual_seed(5)).add_(0.5).to(DEVICE)
    coef = {**COEF, "gamma": 0.0}
    xr, vr = x.double(), v.double()
    fused_update_ref_(xr, vr, g, None, **coef, **NOISE, noise=False, precond=p)
    scale_x = x.double().abs() + abs(coef["delta"]) * p.double() * (
        (coef["alpha"] * v.double()).abs() + (coef["beta"] * g.double()).abs())
    if split:
        hi, lo = split_fp32(x)
        fused_update_(hi, v, g, None, **coef, **NOISE, noise=False, precond=p, x_lo=lo)
        got = join_fp32(hi, lo)
    else:
        got = x.clone()
        fused_update_(got, v, g, None, **coef, **NOISE, noise=False, precond=p)
    assert ((v.double() - vr).abs() <= UPD_RTOL * scale_x.clamp_min(1.0)).all()
    assert ((got.double() - xr).abs() <= UPD_RTOL * scale_x).all()
    # p = 1 is the plain update, bit for bit
    x1, v1, g1 = make(n, torch.bfloat16)
    x2, v2 = x1.clone(), v1.clone()
    fused_update_(x1, v1, g1, None, **coef, **NOISE, noise=False, precond=torch.ones(n, device=DEVICE))
    fused_update_(x2, v2, g1, None, **coef, **NOISE, noise=False)
    assert torch.equal(x1, x2) and torch.equal(v1, v2)
    with pytest.raises(TypeError, match="precond must be float32"):
        fused_update_(x1, v1, g1, None, **coef, **NOISE, noise=False, precond=torch.ones(n, dtype=torch.float64))
    with pytest.raises(ValueError, match="precond has"):
        fused_update_ref_(x1, v1, g1, None, **coef, **NOISE, noise=False, precond=torch.ones(n + 1))
