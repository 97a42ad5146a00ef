"""Trajectory sampler + Metropolis (rtllm/samplers/trajectory.py) on targets with exact answers.

Each statistic is a pooled mean over many independent chains, judged by an ESS-based z-test:
z = (estimate - truth) / (sd / sqrt(ESS)), with ESS from the chains themselves (tests/stats.py).
Every test is seeded, so it is deterministic; the thresholds say how surprising a failure
would be for a correct sampler: |z| < 4.5 per statistic (two-sided normal tail 6.8e-6; the
~1000 statistics below would raise a false alarm for ~0.7% of seeds). Mutation check: with
the accept-rate bounds disabled, these z-tests alone fail for a missing ray Jacobian, a
(D-2) instead of (D-1) exponent, a flipped Metropolis sign and accept-everything.

Step sizes: the paper's hand-tuned RTS steps for iid Gaussians (algorithms.md section 5) are
dt = 0.71 (D = 2..10), 0.52 (D = 100), 0.26 (D = 1000) with trajectories of pi/2 time units,
read here as n_leapfrog = round((pi/2) / dt) (2, 3, 6 steps; |v| ~ sqrt(D) mom_norm, so the
physical path is ~ (pi/2) sqrt(D), a quarter period of a unit Gaussian).
"""
import math

import numpy as np
import pytest
import torch

from rtllm.samplers.trajectory import sample_trajectories
from stats import ess, z_scores

F64 = torch.float64
Z_MAX = 4.5  # per statistic; see the module docstring for its sigma


pytestmark = pytest.mark.usefixtures("one_thread")


def run(log_prob, x0, **kw):
    result = sample_trajectories(log_prob, x0, **kw)
    rate = float(result.accept_rate.mean())
    print(f"accept rate {rate:.3f} ({x0.shape[0]} chains x {kw['n_samples']} trajectories)")
    return result, rate


def assert_z(stats: dict, truth: dict, burn: int = 0):
    """z-test each statistic: stats[name] = values [n, chains, ...], truth[name] broadcastable."""
    for name, values in stats.items():
        z, n_eff = (np.atleast_1d(a) for a in z_scores(values[burn:], truth[name]))
        worst = int(np.argmax(np.abs(z)))
        n_draws = values[burn:].shape[0] * values.shape[1]
        print(f"  {name}: max|z| {abs(z[worst]):.2f} (index {worst}), ESS/draw "
              f"{n_eff.min() / n_draws:.3f}..{n_eff.max() / n_draws:.3f}")
        assert np.all(np.isfinite(z)), name
        assert abs(z[worst]) < Z_MAX, f"{name}[{worst}]: z = {z[worst]:.2f}, ESS = {n_eff[worst]:.0f}"


def gaussian_x0(chains, dim, sd, seed=1, scale=1.5):
    """Overdispersed start: 1.5x the target's sd, so the chains must contract."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(chains, dim, generator=gen, dtype=F64) * sd * scale


@pytest.mark.parametrize("phi", [0.8, -0.5])
def test_ess_helper_on_ar1_chains(phi):
    """The z-tests are only as honest as the ESS: on AR(1) chains (tau = (1+phi)/(1-phi)) the
    estimate is within 2-3% (sd over seeds, measured) of the truth; 12% is > 4 sigma."""
    rng = np.random.default_rng(3)
    n, chains = 400, 256
    x = np.empty((n, chains))
    x[0] = rng.standard_normal(chains)
    noise = rng.standard_normal((n, chains)) * math.sqrt(1 - phi**2)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + noise[t]
    truth = n * chains * (1 - phi) / (1 + phi)
    assert ess(x[:, :, None])[0] == pytest.approx(truth, rel=0.12)


# ------------------------------------------------------------------- iid Gaussian
IID_CASES = {
    # name: (D, chains, dt, n_leapfrog, method, refresh_rate, mom_norm, accept range)
    "ray-D2": (2, 1024, 0.71, 2, "ray", 0.0, 1.0, (0.85, 0.99)),
    "ray-D10": (10, 1024, 0.71, 2, "ray", 0.0, 1.0, (0.75, 0.98)),
    "ray-D100": (100, 256, 0.52, 3, "ray", 0.0, 1.0, (0.80, 0.97)),
    # partial refresh inside the trajectory, with mom_norm != 1 (time scaled by 1/mom_norm)
    "ray-D100-refresh-m2": (100, 256, 0.26, 3, "ray", 2.0, 2.0, (0.80, 0.97)),
    "hmc-D100": (100, 256, 0.52, 3, "hmc", 0.0, 1.0, (0.60, 0.90)),
    "hmc-D100-refresh": (100, 256, 0.52, 3, "hmc", 1.0, 1.0, (0.60, 0.90)),
}


def _iid_gaussian(case, n_samples=300, extra=()):
    dim, chains, dt, n_leap, method, rate, mom_norm, (lo, hi) = case
    res, acc = run(lambda x: -0.5 * (x * x).sum(-1), gaussian_x0(chains, dim, 1.0), n_samples=n_samples,
                   n_leapfrog=n_leap, dt=dt, method=method, refresh_rate=rate, mom_norm=mom_norm, seed=5)
    assert lo < acc < hi  # expected rate for this step; 0 or 1 would mean a broken integrator or test
    s = res.samples.numpy()
    assert_z({"mean": s, "var": s**2, "radius2/D": (s**2).mean(-1, keepdims=True)},
             {"mean": 0.0, "var": 1.0, "radius2/D": 1.0}, burn=n_samples // 4)


@pytest.mark.parametrize("name", IID_CASES)
def test_iid_gaussian_mean_and_variance(name):
    """Per-coordinate mean and variance, and |x|^2/D (the slowest statistic for HMC), from a
    1.5x overdispersed start with the first quarter of each chain discarded."""
    _iid_gaussian(IID_CASES[name])


@pytest.mark.slow
def test_iid_gaussian_1000d():
    _iid_gaussian((1000, 128, 0.26, 6, "ray", 0.0, 1.0, (0.80, 0.97)), n_samples=600)


# ------------------------------------------------------------ ill-conditioned Gaussian
def test_ill_conditioned_gaussian():
    """50-d, variances log-spaced from 0.01 to 1 (condition number 100), dt limited by the
    narrowest direction (sd 0.1) and the trajectory long enough (1.6 time units) for the widest."""
    dim, chains, n = 50, 256, 300
    var = torch.logspace(-2, 0, dim, dtype=F64)
    res, acc = run(lambda x: -0.5 * (x * x / var).sum(-1), gaussian_x0(chains, dim, var.sqrt()),
                   n_samples=n, n_leapfrog=16, dt=0.1, seed=6)
    assert 0.75 < acc < 0.95
    s = res.samples.numpy() / var.sqrt().numpy()  # standardized: truth 0 and 1 everywhere
    assert_z({"mean": s, "var": s**2, "chi2/D": (s**2).mean(-1, keepdims=True)},
             {"mean": 0.0, "var": 1.0, "chi2/D": 1.0}, burn=n // 4)


# ------------------------------------------------------------------- Rosenbrock pairs
def rosenbrock_log_prob(x):
    """-sum_i [100 (x_{2i-1}^2 - x_{2i})^2 + (x_{2i-1} - 1)^2] (algorithms.md section 5)."""
    a, b = x[:, 0::2], x[:, 1::2]
    return -((a - 1) ** 2 + 100 * (b - a * a) ** 2).sum(-1)


def rosenbrock_exact(chains, pairs, seed):
    """Exact samples: x_odd ~ N(1, 0.5), x_even ~ N(x_odd^2, 0.005)."""
    gen = torch.Generator().manual_seed(seed)
    a = 1 + math.sqrt(0.5) * torch.randn(chains, pairs, generator=gen, dtype=F64)
    b = a * a + math.sqrt(0.005) * torch.randn(chains, pairs, generator=gen, dtype=F64)
    return torch.stack([a, b], -1).reshape(chains, 2 * pairs)


# Analytic moments: E x_odd = 1, Var x_odd = 0.5; E x_even = E x_odd^2 = 1 + 0.5 = 1.5,
# Var x_even = Var(x_odd^2) + 0.005 = (2 s^4 + 4 mu^2 s^2) + 0.005 = 0.5 + 2 + 0.005 = 2.505.
ROSEN_MEAN = np.array([1.0, 1.5])
ROSEN_VAR = np.array([0.5, 2.505])


def _rosenbrock(x0, n, burn, dt=0.015, n_leapfrog=100):
    pairs = x0.shape[1] // 2
    res, acc = run(rosenbrock_log_prob, x0, n_samples=n, n_leapfrog=n_leapfrog, dt=dt, seed=7)
    assert 0.85 < acc < 0.99
    s = res.samples.numpy()
    mu, var = np.tile(ROSEN_MEAN, pairs), np.tile(ROSEN_VAR, pairs)
    # var: E (x - mu)^2 = Var; its z-test is the z-test of the standard deviation (delta method).
    assert_z({"mean": s, "var": (s - mu) ** 2}, {"mean": mu, "var": var}, burn=burn)


@pytest.mark.slow  # ~23 s: the suite stays under 8 minutes (README: the slow set)
def test_rosenbrock_pairs_10d():
    """Chains start from exact samples, so every draw counts; a sampler with the wrong
    stationary law drifts away within its autocorrelation time (~10-30 trajectories). dt = 0.015:
    the valley is ~0.07 wide and |v| ~ sqrt(10); 100 steps = 1.5 time units per trajectory."""
    _rosenbrock(rosenbrock_exact(256, 5, seed=8), n=300, burn=0)


@pytest.mark.slow
def test_rosenbrock_pairs_10d_from_a_point():
    """Convergence, not only stationarity: all chains start at x = (1, 1, ...)."""
    _rosenbrock(torch.ones(512, 10, dtype=F64), n=1000, burn=200)


# ---------------------------------------------------------------- bimodal mixture
def bimodal(sep, weights=(0.3, 0.7)):
    w = torch.tensor(weights, dtype=F64)
    mus = torch.tensor([[-sep, 0.0], [sep, 0.0]], dtype=F64)

    def log_prob(x):
        return torch.logsumexp(w.log() - 0.5 * ((x[:, None, :] - mus) ** 2).sum(-1), -1)

    phi = 0.5 * math.erfc(sep / math.sqrt(2))  # P(N(0,1) > sep)
    truth = {
        "P(x0 > 0)": weights[0] * phi + weights[1] * (1 - phi),
        "x": np.array([(weights[1] - weights[0]) * sep, 0.0]),
        "x^2": np.array([sep**2 + 1.0, 1.0]),
    }
    return log_prob, mus, truth


def _bimodal(sep, chains, n, dt=0.71, n_leapfrog=2):
    """All chains start in the *minor* mode: reaching P(x0 > 0) = 0.69 needs ~40% of the mass
    to cross the barrier, at the rate set by the relative weights."""
    log_prob, mus, truth = bimodal(sep)
    res, acc = run(log_prob, mus[0].repeat(chains, 1).clone(), n_samples=n, n_leapfrog=n_leapfrog,
                   dt=dt, seed=9)
    assert 0.85 < acc < 0.99
    s = res.samples.numpy()
    burn = n // 4
    switches = float((np.diff(s[burn:, :, 0] > 0, axis=0)).mean())
    print(f"  mode switches per trajectory {switches:.4f}")
    assert switches > 0.002  # the test only means something if chains cross the barrier
    assert_z({"P(x0 > 0)": (s[..., :1] > 0).astype(float), "x": s, "x^2": s**2}, truth, burn=burn)


def test_bimodal_mixture_weights():
    """0.3 N((-2, 0), I) + 0.7 N((2, 0), I): modes 4 sd apart (midpoint density e^-2 = 14% of
    one component's peak), so rays switch modes every ~20 trajectories: the weights are tested."""
    _bimodal(sep=2.0, chains=512, n=300)


@pytest.mark.slow
def test_bimodal_mixture_weights_far_modes():
    """Modes 6 sd apart (midpoint density e^-4.5 = 1%): ~200 trajectories per switch."""
    _bimodal(sep=3.0, chains=512, n=4000)


# ------------------------------------------------------------------- bookkeeping
def test_result_bookkeeping_and_determinism():
    log_prob = lambda x: -0.5 * (x * x).sum(-1)  # noqa: E731
    x0 = gaussian_x0(64, 5, 1.0)
    kw = dict(n_samples=40, n_leapfrog=3, dt=0.9, seed=11)  # large step: many rejections
    res = sample_trajectories(log_prob, x0, **kw)
    s, acc = res.samples, res.accepted
    assert s.shape == (40, 64, 5) and res.log_prob.shape == (40, 64) and acc.dtype == torch.bool
    assert s.dtype == F64
    prev = torch.cat([x0[None], s[:-1]])
    moved = (s != prev).any(-1)
    assert torch.equal(moved, acc)  # accepted trajectories move, rejected ones stay put
    torch.testing.assert_close(res.log_prob, log_prob(s.reshape(-1, 5)).reshape(40, 64), rtol=0, atol=0)
    torch.testing.assert_close(res.accept_rate, acc.double().mean(0))
    assert 0.2 < float(res.accept_rate.mean()) < 0.95  # both outcomes occur
    again = sample_trajectories(log_prob, x0, **kw)
    assert torch.equal(again.samples, s)  # same seed, same chain
    other = sample_trajectories(log_prob, x0, **{**kw, "seed": 12})
    assert not torch.equal(other.samples, s)
    assert torch.equal(x0, gaussian_x0(64, 5, 1.0))  # the input is not modified


# ---------------------------------------------------------------------- bad input
def _gauss(x):
    return -0.5 * (x * x).sum(-1)


GOOD = dict(n_samples=2, n_leapfrog=2, dt=0.1)
X0 = torch.zeros(4, 3, dtype=F64)


BAD = {
    "method": (X0, dict(method="mala"), "method"),
    "x0-1d": (torch.zeros(3, dtype=F64), {}, "x0"),
    "D=1-ray": (torch.zeros(4, 1, dtype=F64), {}, "D >= 2"),
    "mom_norm-hmc": (X0, dict(method="hmc", mom_norm=2.0), "mom_norm"),
    "n_samples=0": (X0, dict(n_samples=0), "n_samples"),
    "n_samples-float": (X0, dict(n_samples=2.0), "n_samples"),
    "n_leapfrog=0": (X0, dict(n_leapfrog=0), "n_leapfrog"),
    "dt=0": (X0, dict(dt=0.0), "dt"),
    "dt<0": (X0, dict(dt=-0.1), "dt"),
    "dt=nan": (X0, dict(dt=float("nan")), "dt"),
    "refresh_rate<0": (X0, dict(refresh_rate=-1.0), "refresh_rate"),
    # Not validated today. dt = inf and refresh_rate = nan give all-NaN proposals (every
    # trajectory silently rejected); mom_norm = 0 a chain that never moves; RayTracer
    # refuses non-finite and non-positive values of all three (samplers._check_number).
    "dt=inf": (X0, dict(dt=float("inf")), "dt"),
    "refresh_rate=nan": (X0, dict(refresh_rate=float("nan")), "refresh_rate"),
    "mom_norm=0-ray": (X0, dict(mom_norm=0.0), "mom_norm"),
    "mom_norm<0-ray": (X0, dict(mom_norm=-1.0), "mom_norm"),
    "mom_norm=nan-ray": (X0, dict(mom_norm=float("nan")), "mom_norm"),
    "x0-int": (torch.zeros(4, 3, dtype=torch.long), {}, "x0"),  # today: RuntimeError from autograd
}


@pytest.mark.parametrize("x0, kwargs, match", BAD.values(), ids=BAD.keys())
def test_bad_arguments_are_named(x0, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_trajectories(_gauss, x0, **{**GOOD, **kwargs})


def test_log_prob_of_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match="log_prob"):
        sample_trajectories(lambda x: -0.5 * (x * x), X0, **GOOD)
