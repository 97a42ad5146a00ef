"""The prior's energy (MCLMC at step boundaries) makes one host sync per call, not one per chunk
(372 chunks per step at GPT-2 XL before: each float() of a CUDA tensor waits for the GPU)."""
from __future__ import annotations

import torch

import rtllm
from rtllm.samplers import prior as prior_module


def test_neg_log_density_reads_the_device_once(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (300, 517)]
    opt = rtllm.RayTracer(params, dt=1e-2, seed=1, ray="model", prior_scale=0.5, backend="torch")
    monkeypatch.setattr(prior_module, "_CHUNK", 64)  # 13 chunks: one sync each before the fix
    reads = []
    for name in ("__float__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads.append(name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    got = opt.prior.neg_log_density(opt.shards)
    monkeypatch.undo()
    assert len(reads) == 1, reads
    x = torch.cat([s.x for s in opt.shards]).double()
    # The squares are fp32 (relative rounding <= 2^-24 each), summed in float64.
    assert abs(got - float((x * x).sum()) / (2 * 0.5**2)) <= 2**-23 * got
