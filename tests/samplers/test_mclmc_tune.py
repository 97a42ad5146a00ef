"""MILE-style tuning of MCLMC (rtllm/samplers/mclmc_tune.py) on Gaussians with known answers.

Phases are scaled down from MILE's 40k/5k/5k. Every test is seeded, so deterministic; each
threshold states how far it sits from what the tuner gives on these targets.

Note on the targets: on a Gaussian, MCLMC's energy error stays tiny until the integrator nears
its stability edge and then rises steeply (200-d, scales 0.5..2: Var[dE]/D = 0.006, 0.10, 0.74
at step sizes 18, 19, 20). MILE's final target 0.1 sits on that cliff, where a 1% change of the
step size changes the variance by ~50%; the tests use a target of 0.01 -> 0.002, where the
variance grows like eps^8 and the achieved value is a meaningful measurement.
"""
import math

import numpy as np
import pytest
import torch

import rtllm
from rtllm.samplers.mclmc_tune import tune_mclmc
from rtllm.samplers.trajectory import MCLMCChains

TARGET = (0.01, 0.002)


pytestmark = pytest.mark.usefixtures("one_thread")


def sigma(dim):
    return torch.linspace(0.5, 2.0, dim, dtype=torch.float64)


def gaussian_chains(dim, chains, seed=0, step_size=2.0, nan_beyond=None):
    s = sigma(dim)

    def log_prob(x):
        lp = -0.5 * ((x / s) ** 2).sum(-1)
        if nan_beyond is not None:  # a density that breaks down far out: divergences
            lp = torch.where((x / s).abs().amax(-1) > nan_beyond, torch.full_like(lp, math.nan), lp)
        return lp

    x0 = torch.randn(chains, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * s
    return MCLMCChains(log_prob, x0, step_size=step_size, L=5.0, seed=seed)


def test_tuner_lands_the_energy_variance_near_its_target():
    """200-d Gaussian, 16 chains each tuned alone (600 + 200 steps). Then 500 steps at the tuned
    values: the chains' mean Var[dE]/D measured 0.0017-0.0019 over three seeds (target 0.002;
    the ~10% shortfall is the eps^6 law used on a locally ~eps^8 curve while eps falls with
    the target). Seed-to-seed sd ~5%: the +-30% window is > 4 sd from the measured values.
    Phase II's L = sqrt(sum of variances) measured within 3% of the truth (18.72)."""
    dim = 200
    chains = gaussian_chains(dim, 16)
    eps, L, info = tune_mclmc(chains, phase1=600, phase2=200, phase3=0, target_var=TARGET)
    assert np.array_equal(eps, chains.step_size) and np.array_equal(L, chains.L)
    np.testing.assert_allclose(info.target_var[[0, -1]], TARGET)
    run = chains.run(500)
    achieved = np.nanmean(run.energy_change**2, axis=0).mean() / dim
    print(f"eps {eps.mean():.2f} +- {eps.std():.2f}, Var[dE]/D {achieved:.4g} (target {TARGET[1]})")
    assert abs(achieved / TARGET[1] - 1) < 0.3
    truth = float(sigma(dim).pow(2).sum().sqrt())
    assert abs(info.L_phase2.mean() / truth - 1) < 0.1
    assert not run.diverged.any() and info.divergences.sum() == 0


def test_optimizer_and_chains_forms_tune_alike_and_phase3_sets_L():
    """One implementation, two forms: an MCLMC optimizer on a 50-d Gaussian 'model' lands on the
    step size the log-density chains find (measured within 3.5% over three seeds; a chain's
    eps has sd ~3%, so 12% is ~4 sd), and both leave L = 0.4 eps mean(N/ESS) from phase III."""
    dim = 50
    s = sigma(dim)
    gen = torch.Generator().manual_seed(1)
    x = torch.nn.Parameter((torch.randn(dim, dtype=torch.float64, generator=gen) * s).float())
    opt = rtllm.MCLMC([x], step_size=1.0, L=5.0, scale_likelihood=1.0, seed=1)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((x / s.float()) ** 2).sum()
        loss.backward()
        return loss

    kw = dict(phase1=200, phase2=100, phase3=100, target_var=TARGET)
    eps, L, info = tune_mclmc(opt, closure, **kw)
    assert isinstance(eps, float) and (opt.step_size, opt.L) == (eps, L)
    assert L == pytest.approx(0.4 * eps * info.autocorr_time[0], rel=1e-12)
    chains = gaussian_chains(dim, 8, seed=1)
    eps_c, L_c, info_c = tune_mclmc(chains, **kw)
    np.testing.assert_allclose(L_c, 0.4 * eps_c * info_c.autocorr_time, rtol=1e-12)
    print(f"optimizer eps {eps:.3f} L {L:.2f}; chains eps {eps_c.mean():.3f} L {L_c.mean():.2f}")
    assert abs(math.log(eps / eps_c.mean())) < 0.12
    assert info.ess_coords == dim and info.variance_coords == dim


def test_divergences_cap_the_step_size_and_tuning_finishes():
    """A density that is NaN beyond 6 sigma and a start step size 15x too large: the chains
    diverge, are restored, the step size is capped, and tuning ends finite and stable."""
    chains = gaussian_chains(50, 4, step_size=100.0, nan_beyond=6.0)
    with np.errstate(all="ignore"):
        eps, L, info = tune_mclmc(chains, phase1=150, phase2=50, phase3=50, target_var=TARGET)
    assert info.divergences.sum() > 0
    assert np.isfinite(eps).all() and np.isfinite(L).all() and (eps < 20).all()
    run = chains.run(50)
    assert not run.diverged.any()


def test_tuning_is_deterministic_given_seeds():
    results = []
    for _ in range(2):
        chains = gaussian_chains(30, 3, seed=4)
        eps, L, _ = tune_mclmc(chains, phase1=40, phase2=20, phase3=30, variance_coords=10,
                               ess_coords=7, seed=3)
        results.append((eps, L, chains.x.clone()))
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])
    assert torch.equal(results[0][2], results[1][2])


def test_bad_input():
    chains = gaussian_chains(10, 2)
    x = torch.nn.Parameter(torch.zeros(10))
    opt = rtllm.MCLMC([x], step_size=1.0, L=5.0)
    with pytest.raises(ValueError, match="needs a closure"):
        tune_mclmc(opt)
    with pytest.raises(ValueError, match="closure must return the loss"):
        tune_mclmc(opt, lambda: None, phase1=2, phase2=0, phase3=0)
    with pytest.raises(ValueError, match="pass no closure"):
        tune_mclmc(chains, lambda: None)
    with pytest.raises(TypeError, match="rtllm.MCLMC or an MCLMCChains"):
        tune_mclmc(rtllm.RayTracer([torch.nn.Parameter(torch.zeros(3))], dt=0.1))
    for kw, match in ((dict(phase1=-1), "phase1 must be an int >= 0"),
                      (dict(phase3=2.5), "phase3 must be an int >= 0"),
                      (dict(target_var=(0.5, -0.1)), "target_var must be finite and > 0"),
                      (dict(ess_coords=0), "ess_coords must be an int >= 1"),
                      (dict(initial_L=0.0), "L must be a finite number > 0")):
        with pytest.raises(ValueError, match=match):
            tune_mclmc(chains, **kw)
