"""State layouts: the fp32-split layout is the fp32 chain bit for bit, and the storage
emulation of scripts/precision_study.py behaves as its findings say (docs/precision.md)."""
import math
import os
import sys

import pytest
import torch

from repo_paths import SCRIPTS
import rtllm
from rtllm.kernels.reference import fused_update_ref_, join_fp32, split_fp32

sys.path.insert(0, str(SCRIPTS))
import precision_storage as storage  # noqa: E402
import precision_study as study  # noqa: E402


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# ---------------------------------------------------------------- the split codec
def test_split_is_a_bijection_and_its_high_plane_is_round_to_nearest():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=gen) * torch.exp(4 * torch.randn(200_000, generator=gen))
    special = [0.0, -0.0, 1.0, -1.5, 1e-40, -1e-45, 3.4e38, float("inf"), float("-inf")]
    x = torch.cat([x, torch.tensor(special)])
    ties = (bits(x[:1000]) & -65536) | 0x8000  # low half exactly halfway between two bf16
    x = torch.cat([x, ties.view(torch.float32)])
    hi, lo = split_fp32(x)
    assert hi.dtype == torch.bfloat16 and lo.dtype == torch.int16
    assert torch.equal(bits(join_fp32(hi, lo)), bits(x))
    nan = torch.tensor([float("nan")])
    assert torch.isnan(join_fp32(*split_fp32(nan))).all()
    # The high plane is the bf16 model weight: round to nearest, ties away from zero.
    finite = torch.isfinite(x)
    rn = x.to(torch.bfloat16).float()
    off = (hi.float() - x).abs()[finite]
    assert (off <= (rn - x).abs()[finite]).all()
    is_tie = (bits(x) & 0xFFFF) == 0x8000  # the 1000 made above, and any random ones
    same = (hi.float() == rn) | is_tie
    assert same.all()
    assert (hi.float()[is_tie].abs() >= x[is_tie].abs()).all()  # ties round away from zero


def test_split_update_is_the_fp32_update_in_the_reference():
    gen = torch.Generator().manual_seed(1)
    for n in (1, 17, 1025):
        x = 0.02 * torch.randn(n, generator=gen)
        v = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen).to(torch.bfloat16)
        kw = dict(alpha=0.9, beta=-0.3, gamma=0.2, delta=2e-6, seed=7, step=3, stream=1, offset=5)
        x32, v32 = x.clone(), v.clone()
        fused_update_ref_(x32, v32, g, None, **kw)
        hi, lo = split_fp32(x)
        vs = v.clone()
        fused_update_ref_(hi, vs, g, None, x_lo=lo, **kw)
        assert torch.equal(bits(join_fp32(hi, lo)), bits(x32)) and torch.equal(vs, v32)


def test_split_checks_its_tensors():
    hi, lo = split_fp32(torch.zeros(4))
    v, g = torch.zeros(4), torch.zeros(4)
    kw = dict(alpha=1.0, beta=0.0, gamma=0.0, delta=1.0, seed=0, step=0, stream=1, noise=False)
    with pytest.raises(TypeError, match="x bf16, x_lo int16 and v fp32"):
        fused_update_ref_(hi, v.double(), g, None, x_lo=lo, **kw)
    with pytest.raises(ValueError, match="compute=None"):
        fused_update_ref_(hi, v, g, torch.zeros(4, dtype=torch.bfloat16), x_lo=lo, **kw)


# ---------------------------------------------------------------- the sampler layout
def _start_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [(0.02 * torch.randn(n, generator=gen)).to(torch.bfloat16) for n in (1037, 17)]


def _chain(layout: str, backend: str, steps: int = 6, seed: int = 3):
    """A RayTracer on bf16 parameters whose gradient is computed from the fp32 position, so the
    two layouts see identical gradients and may be compared bit for bit."""
    params = [torch.nn.Parameter(p) for p in _start_params()]
    opt = rtllm.RayTracer(params, dt=4e-6, seed=seed, layout=layout, backend=backend,
                          refresh_rate=5.0, scale_likelihood=1.0)
    center = torch.linspace(-0.05, 0.05, sum(p.numel() for p in params))
    for _ in range(steps):
        opt.zero_grad()
        grad = (torch.cat([s.position() for s in opt.shards]) - center) / 1e-6
        for p, part in zip(params, grad.split([p.numel() for p in params])):
            p.grad.copy_(part.view_as(p))
        opt.step()
    return opt, params


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_split_chain_is_the_fp32_chain(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("CPU tensors with backend='triton' need TRITON_INTERPRET=1 (no CUDA)")
    plain, _ = _chain("fp32", backend)
    split, params = _chain("fp32-split", backend)
    for a, b in zip(plain.shards, split.shards):
        assert torch.equal(bits(b.position()), bits(a.x)) and torch.equal(b.v, a.v)
        assert b.compute is None and b.x.dtype == torch.bfloat16 and b.x_lo.dtype == torch.int16
    # The model computes with the high plane: round to nearest of the fp32 position, in place.
    shard = split.shards[0]
    assert params[0].data_ptr() == shard.x.data_ptr()
    assert torch.equal(shard.x.float(), shard.position().to(torch.bfloat16).float())
    # Most moves are below half a bf16 spacing, which bf16 storage would have rounded away.
    start = _start_params()[0].float()
    moved = (shard.position()[:1037] - start).abs()
    half_ulp = torch.ldexp(torch.ones_like(start), torch.frexp(start)[1] - 9)
    assert (moved > 0).float().mean() > 0.99 and (moved < half_ulp).float().mean() > 0.5


def test_state_dict_moves_between_layouts_and_resumes_exactly():
    split, _ = _chain("fp32-split", "torch", steps=4)
    state = {k: v for k, v in split.state_dict().items()}
    shard = split.shards[0]
    planes = state["position"][0][0]  # the planes themselves: a checkpoint joins nothing on the device
    assert state["layout"] == "fp32-split" and planes["hi"] is shard.x and planes["lo"] is shard.x_lo
    plain, _ = _chain("fp32", "torch", steps=1, seed=99)  # another chain, then overwritten
    plain.load_state_dict(state)
    assert torch.equal(plain.shards[0].x, split.shards[0].position())
    back, _ = _chain("fp32-split", "torch", steps=1, seed=98)
    back.load_state_dict(plain.state_dict())
    assert torch.equal(back.shards[0].x, split.shards[0].x)
    assert torch.equal(back.shards[0].x_lo, split.shards[0].x_lo)


def test_a_split_checkpoint_resumes_in_either_layout_and_a_damaged_one_is_refused(tmp_path):
    from rtllm.run.checkpoint import load_checkpoint, save_checkpoint

    split, _ = _chain("fp32-split", "torch", steps=4)
    save_checkpoint(tmp_path / "c.safetensors", split.state_dict())
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    again, _ = _chain("fp32-split", "torch", steps=1, seed=97)
    again.load_state_dict(loaded)
    assert torch.equal(bits(again.shards[0].position()), bits(split.shards[0].position()))
    plain, _ = _chain("fp32", "torch", steps=1, seed=96)
    plain.load_state_dict(loaded)
    assert torch.equal(bits(plain.shards[0].x), bits(split.shards[0].position()))
    for other in (again, plain):
        assert torch.equal(other.shards[0].v, split.shards[0].v)
    planes = loaded["position"][0][0]
    for damaged in ({"hi": planes["hi"]}, {"hi": planes["lo"], "lo": planes["lo"]},
                    {"hi": planes["hi"][:-1], "lo": planes["lo"][:-1]}):
        state = {**loaded, "position": [[damaged]]}
        target = _chain("fp32-split", "torch", steps=1)[0]
        before = target.shards[0].position().clone()
        with pytest.raises(ValueError, match="shard sizes|'hi' \\(bfloat16\\) and 'lo' \\(int16\\)"):
            target.load_state_dict(state)
        assert torch.equal(bits(target.shards[0].position()), bits(before))  # refused before writing


def test_layout_errors_say_what_to_do():
    fp32_param = [torch.nn.Parameter(torch.randn(10))]
    with pytest.raises(ValueError, match="needs bf16 parameters.*model.to\\(torch.bfloat16\\)"):
        rtllm.RayTracer(fp32_param, dt=1e-3, layout="fp32-split")
    with pytest.raises(ValueError, match="registered layouts: fp32, fp32-split"):
        rtllm.RayTracer(fp32_param, dt=1e-3, layout="bf16")
    from rtllm.samplers.mclmc import MCLMC

    bf16_param = [torch.nn.Parameter(torch.randn(10).to(torch.bfloat16))]
    with pytest.raises(ValueError, match="supports layout 'fp32'"):
        MCLMC(bf16_param, step_size=0.1, L=1.0, layout="fp32-split")


def test_layout_registry_bytes():
    from rtllm.state.layouts import LAYOUTS

    assert sum(LAYOUTS["fp32"].bytes_per_param(2).values()) == 12
    assert sum(LAYOUTS["fp32-split"].bytes_per_param(2).values()) == 10
    assert storage.bytes_per_param("fp32-split") == 10 and storage.bytes_per_param("fp32") == 12


# ---------------------------------------------------------------- the study's emulation
def test_stochastic_rounding_is_unbiased_on_a_fixed_update():
    # x on the bf16 grid, a move of 1e-4 of it: far below the spacing, so round to nearest
    # would drop it; stochastic rounding keeps it in expectation.
    x, move, n = 0.0157, 1.6e-6, 400_000
    start = torch.tensor(x).to(torch.bfloat16).float()
    target = start + move
    gen = torch.Generator().manual_seed(0)
    out = storage.stochastic_round_bf16(target.expand(n).contiguous(), gen).double()
    ulp = (torch.nextafter(start.to(torch.bfloat16), torch.tensor(1.0, dtype=torch.bfloat16)).double()
           - start.double())
    assert set(out.unique().tolist()) <= {start.item(), start.item() + ulp.item()}
    p = (float(target) - start.item()) / ulp.item()  # probability of rounding up
    sigma = math.sqrt(p * (1 - p) / n) * ulp.item()  # sd of the mean of n roundings
    assert abs(out.mean().item() - float(target)) < 4 * sigma  # 4 sigma: false alarm 6e-5


def test_round_to_nearest_freezes_and_the_pair_tracks_fp32():
    gen = torch.Generator().manual_seed(0)
    x0 = 0.02 * torch.randn(4096, generator=gen)
    moves = 1e-4 * x0.abs() * torch.randn(50, 4096, generator=gen)  # the realistic scale
    state = {k: storage.encode(k, x0, gen) for k in ("fp32", "pair-bf16", "bf16-rn", "fp32-split")}
    for m in moves:
        state = {k: storage.encode(k, storage.decode(k, s) + m, gen) for k, s in state.items()}
    fp32 = storage.decode("fp32", state["fp32"])
    rn = storage.decode("bf16-rn", state["bf16-rn"])
    assert torch.equal(rn, x0.to(torch.bfloat16).float())  # frozen: every move was rounded away
    assert torch.equal(bits(storage.decode("fp32-split", state["fp32-split"])), bits(fp32))
    # The bf16+bf16 pair: each store rounds lo, |lo| <= ulp(hi)/2, to bf16: an error of at most
    # ulp(hi) * 2^-10 per step, so 50 steps stay within 50 * 2^-10 ulp of the fp32 sum.
    pair = storage.decode("pair-bf16", state["pair-bf16"])
    ulp = torch.ldexp(torch.ones_like(fp32), torch.frexp(fp32)[1] - 8)
    assert ((pair - fp32).abs() <= 50 * 2.0**-10 * ulp + 1e-9 * fp32.abs()).all()
    assert (pair - fp32).abs().max() < 0.05 * (fp32 - x0).abs().max()  # it moved with fp32


def test_study_chains_fp32_split_is_fp32_and_fp32_tracks_fp64():
    target = study.GaussTarget(2000, seed=0)
    kw = dict(chains=2, dt=2e-6, refresh_rate=250.0, steps=60, burn_in=0, every=20, seed=5)
    runs = {k: study.run_chains(k, target, **kw) for k in ("fp64", "fp32", "fp32-split")}
    for key in runs["fp32"]:
        assert (runs["fp32"][key] == runs["fp32-split"][key]).all(), key
    # Same seed, same noise: over 60 steps the fp32 chain stays within 1e-3 (relative) of float64.
    ratio = runs["fp32"]["var_z"] / runs["fp64"]["var_z"]
    assert abs(ratio - 1).max() < 1e-3 and runs["fp64"]["var_z"][-1].min() > 1e-3  # it moved


def test_split_materializes_a_meta_model_into_its_high_plane():
    from transformers import GPT2Config

    from rtllm.lm.model_io import config_initializer, meta_model

    model = meta_model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=101, n_positions=16),
                       dtype=torch.bfloat16)
    opt = rtllm.RayTracer(model.parameters(), dt=1e-4, layout="fp32-split", device="cpu",
                          init_weights=config_initializer(model))
    shard = opt.shards[0]
    p = next(model.parameters())
    assert p.dtype == torch.bfloat16 and p.data_ptr() == shard.x.data_ptr()
    assert (shard.x_lo == 0).all() and torch.isfinite(shard.position()).all()
    ids = torch.randint(101, (2, 9))
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert (shard.x_lo != 0).any()  # the first step already moved below bf16 resolution
