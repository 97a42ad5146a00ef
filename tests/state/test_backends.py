"""The three backends inside a real sampler: Triton (interpreter on CPU) vs its torch reference,
and the fast torch path's noise (sharding-invariant, standard normal)."""
import pytest
import torch

import rtllm
from rtllm.state.backends import CHUNK
from triton_cpu import triton_on_cpu


def model_and_data(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 31), torch.nn.Tanh(), torch.nn.Linear(31, 3)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    return model, (torch.randn(16, 33, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype))


def chain(backend, steps, dtype=torch.float32, cls=rtllm.RayTracer, **kw):
    model, (x, y) = model_and_data(dtype)
    opt = cls(model.parameters(), dt=1e-2, seed=11, backend=backend, **kw)
    start = opt._flat[0].shards[0].x.clone()
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return opt._flat[0].shards[0].x.clone(), start, opt


@triton_on_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [rtllm.RayTracer, rtllm.HMC])
def test_triton_matches_reference_one_step_tightly_ten_steps_loosely(dtype, cls):
    x1_t, start, _ = chain("triton", 1, dtype, cls)
    x1_r, _, _ = chain("reference", 1, dtype, cls)
    step = (x1_r - start).abs().max()
    # One step: same Philox noise, fp32 arithmetic in both; differences are summation order.
    assert (x1_t - x1_r).abs().max() <= 1e-6 * step + 1e-6 * x1_r.abs().max()
    x10_t, _, ot = chain("triton", 10, dtype, cls)
    x10_r, _, orf = chain("reference", 10, dtype, cls)
    travelled = (x10_r - start).abs().max()
    # Ten steps: chaotic dynamics amplify last-bit differences; 1e-4 of the distance travelled.
    # bf16: the interpreter truncates fp32 -> bf16 casts where torch rounds to nearest, so the
    # compute copies (and the gradients) differ by an ulp from the first step on: 1e-2.
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert (x10_t - x10_r).abs().max() <= tol * travelled
    assert ot.ln_luminosity == pytest.approx(orf.ln_luminosity, rel=10 * tol, abs=1e-6)


@triton_on_cpu
def test_triton_initial_velocity_is_the_philox_stream():
    _, _, ot = chain("triton", 0)
    _, _, orf = chain("reference", 0)
    for a, b in zip(ot.momentum, orf.momentum):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_torch_backend_noise_is_sharding_invariant_across_chunks():
    n = CHUNK + 3001  # the group spans two noise chunks
    params = lambda: [torch.nn.Parameter(torch.zeros(n // 3)) for _ in range(3)]  # noqa: E731
    whole = rtllm.RayTracer(params(), dt=1e-3, ray="model", seed=5)
    pieces = rtllm.RayTracer(params(), dt=1e-3, ray="model", seed=5, max_shard_elements=n // 3 + 7)
    assert len(pieces._flat[0].shards) == 3
    for a, b in zip(whole.momentum, pieces.momentum):
        assert torch.equal(a, b)
    grads = torch.randn(3, n // 3, generator=torch.Generator().manual_seed(0))
    for opt in (whole, pieces):
        for p, g in zip(opt.param_groups[0]["params"], grads):
            p.grad.copy_(g)
        opt.step()
        opt.step()
    # Equal up to the order of the fp32 partial sums (shard boundaries split the chunks).
    for a, b in zip(whole.momentum, pieces.momentum):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    v = torch.cat([m.reshape(-1) for m in whole.momentum])
    # After two steps from N(0, 1) the velocity is still ~N(0, 1): n ~ 2.7e5 draws,
    # sd of the sample variance sqrt(2/n) ~ 2.7e-3; 5 sigma.
    assert abs(float(v.var()) - 1.0) < 0.014
    assert abs(float(v.mean())) < 5 / n**0.5


def test_triton_on_cpu_without_the_interpreter_fails_at_once_with_what_to_do():
    """As on a GPU host (TRITON_INTERPRET unset): a CPU model asking for backend='triton' gets
    one clear line when the sampler is built, not an error at the first launch."""
    import os
    import subprocess
    import sys

    code = ("import torch, rtllm\n"
            "try:\n"
            "    rtllm.RayTracer([torch.nn.Parameter(torch.zeros(8))], dt=0.1, backend='triton')\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "ValueError: backend='triton' on CPU tensors needs TRITON_INTERPRET=1" in out.stdout, out.stderr[-2000:]
    assert "backend='reference'" in out.stdout
