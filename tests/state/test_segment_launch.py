"""Many rays, few launches: the Triton passes over all shards launch once per kind of shard
(Triton interpreter on CPU), with the results of one launch per shard."""
from __future__ import annotations

import pytest
import torch

import rtllm
from rtllm.state.segment_launch import on_device

pytest.importorskip("triton")
from rtllm.kernels import triton_segments, triton_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Sizes with odd lengths, so later groups start at every offset % 4, and blocks end mid-shard.
SIZES = [7, 1024, 2, 2051, 33, 4096, 5, 1030]


def _sampler(rays: int, dtype=torch.float32, layout: str = "fp32", seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(SIZES[i % len(SIZES)], generator=gen).to(DEVICE, dtype))
              for i in range(rays)]
    opt = rtllm.RayTracer([{"params": [p]} for p in params], dt=1e-2, seed=seed, backend="triton",
                          layout=layout)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE, dtype)
    opt._collect_gradient()
    return opt


def _count_launches(monkeypatch) -> dict[str, int]:
    counts = {"per_shard": 0, "segments": 0}

    def counted(module, name, kind):
        original = getattr(module, name)

        def call(*args, **kwargs):
            counts[kind] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, call)

    for name in ("reduce_sums", "fused_update_"):
        counted(triton_step, name, "per_shard")
    for name in ("reduce_segments", "update_segments"):
        counted(triton_segments, name, "segments")
    return counts


KEY = dict(seed=0x5EED, step=9, stream=1, noise=True)


@pytest.mark.parametrize("dtype,layout", [(torch.float32, "fp32"), (torch.bfloat16, "fp32"),
                                          (torch.bfloat16, "fp32-split")])
def test_segment_launches_equal_per_shard_launches(dtype, layout):
    opt = _sampler(len(SIZES), dtype, layout)
    shards = opt.shards
    assert {s.offset % 4 for s in shards} == {0, 1, 2, 3}
    backend = opt.backend
    batched = backend.reduce_shards(shards, **KEY)
    single = torch.stack([backend.reduce(s, **KEY) for s in shards])
    torch.testing.assert_close(batched, single, rtol=1e-15, atol=0)  # float64 sums of the same partials

    twin = _sampler(len(SIZES), dtype, layout)
    alpha = [0.9 - 0.01 * i for i in range(len(shards))]
    beta = [-0.3 + 0.02 * i for i in range(len(shards))]
    gamma = [0.0 if i == 2 else 0.2 for i in range(len(shards))]  # a ray without noise too
    backend.update_shards(shards, alpha, beta, gamma, 0.05, **KEY)
    for s, a, b, c in zip(twin.shards, alpha, beta, gamma):
        twin.backend.update(s, a, b, c, 0.05, **KEY)
    for mine, theirs in zip(shards, twin.shards):  # bit for bit: same fp32 arithmetic, same noise
        assert torch.equal(mine.v, theirs.v)
        assert torch.equal(mine.x, theirs.x)
        if mine.compute is not None:
            assert torch.equal(mine.compute, theirs.compute)
        if mine.x_lo is not None:
            assert torch.equal(mine.x_lo, theirs.x_lo)


def test_launches_per_step_do_not_grow_with_the_number_of_rays(monkeypatch):
    per_rays = {}
    for rays in (len(SIZES), 6 * len(SIZES)):  # both see all four kinds (offset % 4)
        opt = _sampler(rays)
        counts = _count_launches(monkeypatch)
        opt.step()
        opt.step()
        per_rays[rays] = dict(counts)
        monkeypatch.undo()
    few, many = per_rays.values()
    assert few["per_shard"] == many["per_shard"] == 0
    # Per step: one reduce launch per kind (here offset % 4 in {0, 1, 2, 3}), one update launch
    # per kind and noise on/off (rays whose gamma is 0 skip the noise, as per-shard launches do).
    assert few["segments"] == many["segments"]
    assert 2 * (4 + 4) <= many["segments"] <= 2 * (4 + 2 * 4)


def test_launches_go_to_the_tensors_device(monkeypatch):
    """Triton launches on the current device: the segment launch enters the shards' device."""
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)

    class FakeCuda:
        device = torch.device("cuda", 1)

    with on_device(FakeCuda()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with on_device(torch.zeros(1)):  # CPU tensors: nothing to enter
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_preconditioned_update_equals_the_reference(backend):
    """pSMILE's drift preconditioner (Shard.precond): segment launches (with shards at every
    offset % 4) and the torch backend equal the float64 reference's update."""
    from rtllm.kernels.reference import fused_update_ref_

    opt = _sampler(len(SIZES))
    if backend == "torch":
        opt.backend = rtllm.state.backends.make_backend("torch", opt.device)
    gen = torch.Generator().manual_seed(11)
    before = [(s.x.double().clone(), s.v.double().clone()) for s in opt.shards]
    for s in opt.shards:
        s.precond = torch.rand(s.numel, generator=gen).add_(0.25).to(DEVICE)
    alpha = [0.9 - 0.01 * i for i in range(len(SIZES))]
    beta = [-0.3 + 0.02 * i for i in range(len(SIZES))]
    opt.backend.update_shards(opt.shards, alpha, beta, [0.0] * len(SIZES), 0.05, **{**KEY, "noise": False})
    for s, (x, v), a, b in zip(opt.shards, before, alpha, beta):
        fused_update_ref_(x, v, s.g, None, alpha=a, beta=b, gamma=0.0, delta=0.05, seed=KEY["seed"],
                          step=KEY["step"], stream=KEY["stream"], offset=s.offset, noise=False,
                          precond=s.precond)
        torch.testing.assert_close(s.v.double(), v, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.x.double(), x, rtol=1e-6, atol=1e-7)
