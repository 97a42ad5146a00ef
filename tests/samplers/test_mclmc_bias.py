"""The MCLMC bias battery: tuned with the default schedule, unadjusted MCLMC is unbiased within
2 standard errors on Gaussians and Rosenbrock pairs; MILE's schedule is not.

Every target starts from exact draws (so every draw counts), is tuned chain by chain with
rtllm.tune_mclmc (phases 300/100/100 full steps) and then sampled for N_STEPS full steps.
The statistic is E|x|^2; its standard error uses the multi-chain ESS of |x|^2 (tests/stats.py).
MCLMC's bias shrinks like eps^2 (measured on the 100-d Gaussian, 64 chains x 1000-2000 steps:
-2.7% at MILE's 0.5 -> 0.1, -1.0% at 5e-4, -0.45% at 1e-5, -0.33% at 2e-6), so the default
target is small. Seeded, hence deterministic; the thresholds are stated in standard errors.
"""
import math

import numpy as np
import pytest
import torch

from rtllm.samplers.mclmc_tune import TARGET_VAR_SCHEDULES, tune_mclmc
from rtllm.samplers.trajectory import MCLMCChains
from stats import ess

pytestmark = pytest.mark.usefixtures("one_thread")

CHAINS, N_STEPS, PHASES = 32, 1000, (300, 100, 100)


def gaussian(sigma):
    sigma = sigma.double()
    return (lambda x: -0.5 * ((x / sigma) ** 2).sum(-1),
            lambda gen, n: sigma * torch.randn(n, len(sigma), generator=gen, dtype=torch.float64),
            float((sigma ** 2).sum()))


def rosenbrock(dim):
    """Pairs (a, b): a ~ N(1, 1/2), b | a ~ N(a^2, 1/200): E a^2 = 1.5, E b^2 = 4.755."""
    def log_prob(x):
        a, b = x[..., 0::2], x[..., 1::2]
        return -(100 * (a * a - b) ** 2 + (a - 1) ** 2).sum(-1)

    def draw(gen, n):
        a = 1 + math.sqrt(0.5) * torch.randn(n, dim // 2, generator=gen, dtype=torch.float64)
        b = a * a + math.sqrt(0.005) * torch.randn(n, dim // 2, generator=gen, dtype=torch.float64)
        return torch.stack([a, b], -1).reshape(n, dim)

    return log_prob, draw, (1.5 + 4.755) * dim / 2


BATTERY = {
    "gaussian-100d-scales-0.5..2": lambda: gaussian(torch.linspace(0.5, 2.0, 100)),
    "gaussian-100d-scales-0.1..1-log": lambda: gaussian(torch.logspace(-1, 0, 100)),
    "rosenbrock-10d": lambda: rosenbrock(10),
}


def bias_z(name, target_var, seed=0):
    """(relative bias of E|x|^2, its z-score) after tuning with target_var."""
    log_prob, draw, truth = BATTERY[name]()
    x0 = draw(torch.Generator().manual_seed(seed), CHAINS)
    dim = x0.shape[1]
    chains = MCLMCChains(log_prob, x0.clone(), step_size=0.1 * math.sqrt(dim), L=max(math.sqrt(dim), 15.0),
                         seed=seed + 1)
    p1, p2, p3 = PHASES
    with np.errstate(all="ignore"):  # a diverging chain is restored by MCLMCChains
        eps, L, _ = tune_mclmc(chains, phase1=p1, phase2=p2, phase3=p3, target_var=target_var, seed=seed)
        run = MCLMCChains(log_prob, x0.clone(), step_size=eps, L=L, seed=seed + 2).run(N_STEPS)
    sq = (run.samples.numpy() ** 2).sum(-1)  # [steps, chains]
    se = sq.std() / math.sqrt(ess(sq[:, :, None])[0])
    return sq.mean() / truth - 1, (sq.mean() - truth) / se


@pytest.mark.parametrize("name", sorted(BATTERY))
def test_default_schedule_is_unbiased_within_two_standard_errors(name):
    """Measured z at this size: see the printout; |z| < 2 is the issue's criterion (a correct
    sampler passes it 95% of the time at a given seed; the seed is fixed)."""
    bias, z = bias_z(name, "unbiased")
    print(f"{name}: E|x|^2 bias {bias:+.4f}, z {z:+.2f}")
    assert abs(z) < 2.0


@pytest.mark.slow
def test_mile_schedule_is_biased_low_on_the_gaussian():
    """MILE's 0.5 -> 0.1 ends at the integrator's stability edge: E|x|^2 measured 2.7% low at
    z = -30 with 64 chains x 1000 steps (about -20 at this size); -5 leaves a wide margin."""
    assert TARGET_VAR_SCHEDULES["mile"] == (0.5, 0.1)
    bias, z = bias_z("gaussian-100d-scales-0.5..2", "mile")
    print(f"MILE schedule: E|x|^2 bias {bias:+.4f}, z {z:+.2f}")
    assert z < -5 and bias < -0.01


def test_schedule_names_and_bad_names():
    chains = MCLMCChains(lambda x: -0.5 * (x ** 2).sum(-1), torch.zeros(2, 4, dtype=torch.float64),
                         step_size=1.0, L=2.0)
    _, _, info = tune_mclmc(chains, phase1=5, phase2=2, phase3=0, target_var="mile")
    np.testing.assert_allclose(info.target_var[[0, -1]], (0.5, 0.1))
    _, _, info = tune_mclmc(chains, phase1=5, phase2=2, phase3=0)
    np.testing.assert_allclose(info.target_var[[0, -1]], TARGET_VAR_SCHEDULES["unbiased"])
    with pytest.raises(ValueError, match="target_var must be one of unbiased, mile"):
        tune_mclmc(chains, target_var="blackjax")
    with pytest.raises(ValueError, match="target_var must be a"):
        tune_mclmc(chains, target_var=(1.0, 2.0, 3.0))
