"""The analytic half of scripts/bench_samplers.py: targets, the four samplers on log densities
(float64, many chains at once), their tuning, ESS per gradient and the gradient-noise bias.

The protocol is written out in bench_samplers.py's docstring and docs/sampling.md ("Comparing
samplers"); the constants below are its grids and targets.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

import rtllm
from rtllm.samplers import rules
from rtllm.evaluation.diagnostics import MIN_LENGTH_OVER_TAU, integrated_autocorr_time
from rtllm.samplers.trajectory import MCLMCChains

# The SE estimator of the existing noise protocol (larger of Sokal and 20 batch means).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "samplers"))
from test_noisy_gradients import standard_error  # noqa: E402

SAMPLERS = ("ray", "hmc", "mclmc", "sgld")
TUNE_SHARE = 0.2  # of each chain's gradient budget, spent on tuning and counted
BURN_IN_SHARE = 0.1  # of each sampling phase, discarded by every sampler before any statistic
TRAJECTORY_TIME = math.pi / 2  # RT and HMC path time per trajectory (the paper's choice)
REFRESH_RATE = 1 / TRAJECTORY_TIME  # the step (optimizer) form's partial refresh: same decorrelation
ACCEPT_TARGET = 0.8
# Dual averaging (Hoffman & Gelman 2014, algorithm 5): start dt, gamma, t0, kappa.
DA_DT0, DA_GAMMA, DA_T0, DA_KAPPA = 0.1, 0.05, 10.0, 0.75
SGLD_GRID = (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4)  # dt; SGLD step size eps = dt^2 / 2
SGLD_MAX_BIAS = 0.02  # |E|x|^2 / truth - 1| allowed on the tuning run (uses the known truth)
MCLMC_EPS0_PER_SQRT_D = 0.1  # MCLMC's tuner starts at eps = 0.1 sqrt(D)
MAX_STORED = 4000  # draws kept per chain (thinned beyond): bounds memory and ESS cost


# -- targets ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A log density over [chains, D] float64, its exact sampler and E[x_i^2]."""

    name: str
    dim: int
    log_prob: Callable[[Tensor], Tensor]
    draw: Callable[[torch.Generator, int], Tensor]  # n exact draws [n, D]
    second_moment: np.ndarray  # [D]

    @property
    def sq_norm(self) -> float:
        """E|x|^2 under the target."""
        return float(self.second_moment.sum())


def gaussian(name: str, sigma: Tensor) -> Target:
    sigma = sigma.double()
    return Target(name, len(sigma), lambda x: -0.5 * ((x / sigma) ** 2).sum(-1),
                  lambda gen, n: sigma * torch.randn(n, len(sigma), generator=gen, dtype=torch.float64),
                  (sigma ** 2).numpy())


def rosenbrock(dim: int) -> Target:
    """Pairs (a, b): ln p = -sum [100 (a^2 - b)^2 + (a - 1)^2]; exactly a ~ N(1, 1/2) and
    b | a ~ N(a^2, 1/200), so E a^2 = 1.5 and E b^2 = E a^4 + 0.005 = 4.755."""
    if dim % 2:
        raise ValueError(f"the Rosenbrock target needs an even dimension, got {dim}")

    def log_prob(x: Tensor) -> Tensor:
        a, b = x[..., 0::2], x[..., 1::2]
        return -(100 * (a * a - b) ** 2 + (a - 1) ** 2).sum(-1)

    def draw(gen: torch.Generator, n: int) -> Tensor:
        a = 1 + math.sqrt(0.5) * torch.randn(n, dim // 2, generator=gen, dtype=torch.float64)
        b = a * a + math.sqrt(0.005) * torch.randn(n, dim // 2, generator=gen, dtype=torch.float64)
        return torch.stack([a, b], -1).reshape(n, dim)

    return Target("Rosenbrock", dim, log_prob, draw, np.tile([1.5, 4.755], dim // 2))


def make_targets(gauss_dim: int, ill_dim: int, rosen_dim: int) -> list[Target]:
    """Standard Gaussian; Gaussian with scales log-spaced 0.1..1 (condition number 100); Rosenbrock."""
    return [gaussian("Gaussian", torch.ones(gauss_dim)),
            gaussian("ill-conditioned Gaussian", torch.logspace(-1, 0, ill_dim)),
            rosenbrock(rosen_dim)]


# -- gradients ----------------------------------------------------------------------------------
class Counted:
    """A log density counting its calls: one call is one gradient of every chain."""

    def __init__(self, log_prob: Callable[[Tensor], Tensor]) -> None:
        self.log_prob, self.calls = log_prob, 0

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.log_prob(x)


class NoisyGradient:
    """ln p(x) + sigma_c xi.x with xi ~ N(0, I) fresh every call: the gradient is the exact one
    plus sigma_c * xi, the noise of tests/test_noisy_gradients.py (loss gradient x - sigma*xi on
    the Gaussian). sigma: one value per chain."""

    def __init__(self, log_prob: Callable[[Tensor], Tensor], sigma: Tensor, seed: int) -> None:
        self.log_prob, self.sigma = log_prob, sigma.double()
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x: Tensor) -> Tensor:
        xi = torch.randn(x.shape, generator=self.gen, dtype=x.dtype)
        return self.log_prob(x) + self.sigma * (xi * x).sum(-1)


def value_and_grad(log_prob: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        lp = log_prob(xg)
        (grad,) = torch.autograd.grad(lp.sum(), xg)
    return lp.detach(), grad


# -- the step (optimizer) form in float64 -----------------------------------------------------
@torch.no_grad()
def run_step_form(kind: str, log_prob: Callable[[Tensor], Tensor], x0: Tensor, *, dt, steps: int,
                  thin: int, refresh_rate: float = REFRESH_RATE, seed: int = 0,
                  v0: Tensor | None = None) -> Tensor:
    """`steps` steps of the optimizers' schedule (rtllm.samplers.optimizers: RayTracer / HMC first step, then
    steady K(dt/2) O(dt) K(dt/2) D(dt); SGLD full refresh, K(dt/2), D(dt)) for every chain of x0
    [chains, D], folded by the library's scalar rules, one gradient per step, no Metropolis.
    dt: a scalar, or one per chain for SGLD (no partial refresh). Returns x after every
    thin-th step, [steps // thin, chains, D]. v0: the initial velocity (default N(0, I) draws)."""
    kick = rules.ray_kick if kind == "ray" else rules.hmc_kick
    gen = torch.Generator().manual_seed(seed)
    x = x0.clone()
    chains, dim = x.shape
    dims = np.full(chains, float(dim))
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype) if v0 is None else v0.to(x)  # as the optimizers

    def col(c) -> Tensor:  # per-chain scalars as a [chains, 1] column
        return torch.as_tensor(np.broadcast_to(c, (chains,)).copy(), dtype=x.dtype).unsqueeze(-1)

    out = torch.empty(steps // thin, chains, dim, dtype=x.dtype)
    for i in range(steps):
        g = -value_and_grad(log_prob, x)[1]  # gradient of the loss -ln p
        schedule = rtllm.SGLD.schedule(None, "steady", dt, 0.0) if kind == "sgld" else \
            rules.step_schedule("first" if i == 0 else "steady", dt, refresh_rate)
        n = torch.randn(x.shape, generator=gen, dtype=x.dtype) if rules.needs_noise(schedule) \
            else torch.zeros_like(x)
        sums = torch.stack([(v * v).sum(-1), (g * g).sum(-1), (v * g).sum(-1), (n * n).sum(-1),
                            (n * v).sum(-1), (n * g).sum(-1)], -1).numpy()
        with np.errstate(all="ignore"):  # a diverging SGLD grid chain must not warn
            coef = rules.compose(schedule, sums, kick=kick, scale=1.0, dim=dims,
                                 refresh_rate=refresh_rate, mom_norm=1.0)
        v = col(coef.alpha) * v + col(coef.beta) * g + col(coef.gamma) * n
        x = x + col(coef.delta) * v
        if (i + 1) % thin == 0:
            out[(i + 1) // thin - 1] = x
    return out


# -- statistics ---------------------------------------------------------------------------------
def thinning(n: int) -> int:
    """Keep every k-th of n draws, k odd and large enough for MAX_STORED: an even k would see
    only one phase of a period-2 orbit (MCLMC at a large step size falls into one)."""
    k = max(1, math.ceil(n / MAX_STORED))
    return k + 1 - k % 2


def _ess(series: np.ndarray) -> float:
    """n / tau with tau = max(1, Sokal tau of the series, 2 tau' - 1), tau' the mean Sokal tau
    of its even- and odd-indexed halves; 0 when not finite.

    2 tau' - 1 is the autocorrelation time the chain shows when looked at every other draw. It
    exceeds the series' own tau only when odd lags are negatively correlated, as on a period-2
    orbit (MCLMC at a large step size): there the whole-series tau is negative although each
    half drifts slowly. The floor 1 credits an antithetic chain at most one effective draw per
    draw (as in scripts/noisy_gradient_curves.py).
    """
    with np.errstate(all="ignore"):
        whole = integrated_autocorr_time(series)
        halves = 2 * np.mean([integrated_autocorr_time(part) for part in (series[0::2], series[1::2])]) - 1
    if not (math.isfinite(whole) and math.isfinite(halves)):
        return 0.0
    return len(series) / max(1.0, whole, halves)


def chain_stats(samples: Tensor, target: Target, log_prob_values: Tensor | None = None, *,
                ess: bool = True) -> dict:
    """Per chain of samples [n, chains, D] (burn-in dropped here): the bias of E|x|^2 relative
    to the truth with its SE and, with `ess`, the ESS of the worst coordinate and of ln p."""
    samples = samples[int(BURN_IN_SHARE * len(samples)):]
    x = samples.numpy()
    out = {"n": len(x), "ess_coord": [], "ess_lp": [], "bias": [], "bias_se": []}
    if ess:
        lp = target.log_prob(samples) if log_prob_values is None else \
            log_prob_values[len(log_prob_values) - len(samples):]
        for c in range(x.shape[1]):
            out["ess_coord"].append(min(_ess(x[:, c, j]) for j in range(x.shape[2])))
            out["ess_lp"].append(_ess(lp[:, c].numpy()))
    # E|x|^2 is dominated by the large scales; the mean over coordinates of x_i^2 / E[x_i^2]
    # weighs every coordinate alike and shows the bias of the small ones (SGLD's, MCLMC's).
    out["bias_coord"], out["bias_coord_se"] = [], []
    for c in range(x.shape[1]):
        with np.errstate(all="ignore"):
            y = (x[:, c] ** 2).sum(-1) / target.sq_norm
            yw = (x[:, c] ** 2 / target.second_moment).mean(-1)
        for key, series in (("bias", y), ("bias_coord", yw)):
            finite = bool(np.isfinite(series).all())
            out[key].append(float(series.mean() - 1) if finite else math.nan)
            # 20 batch means need >= 40 draws to say anything
            out[key + "_se"].append(standard_error(series) if finite and len(series) >= 40 else math.nan)
    return out


@dataclass
class Run:
    """One sampler on one target: per seed (chain) lists."""

    sampler: str
    target: str
    tuned: list[dict] = field(default_factory=list)
    grads_tune: list[int] = field(default_factory=list)
    grads_sample: list[int] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)  # draws after burn-in that the ESS used
    ess_coord: list[float] = field(default_factory=list)
    ess_lp: list[float] = field(default_factory=list)
    bias: list[float] = field(default_factory=list)
    bias_se: list[float] = field(default_factory=list)
    bias_coord: list[float] = field(default_factory=list)
    bias_coord_se: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, stats: dict, c: int, tuned: dict, grads_tune: int, grads_sample: int) -> None:
        self.tuned.append(tuned)
        self.grads_tune.append(int(grads_tune))
        self.grads_sample.append(int(grads_sample))
        self.stored.append(stats["n"])
        for key in ("ess_coord", "ess_lp", "bias", "bias_se", "bias_coord", "bias_coord_se"):
            getattr(self, key).append(float(stats[key][c]))

    def ess_per_grad(self) -> np.ndarray:
        """Conservative: min(worst coordinate, ln p) ESS over all gradients, tuning included."""
        ess = np.minimum(self.ess_coord, self.ess_lp)
        return ess / (np.array(self.grads_tune) + np.array(self.grads_sample))

    def resolved(self) -> bool:
        """Whether every chain had ESS >= the 50 that rtllm.evaluation.diagnostics asks of a trusted tau."""
        return bool(np.min(np.minimum(self.ess_coord, self.ess_lp)) >= MIN_LENGTH_OVER_TAU)


def combine(bias: list[float], se: list[float]) -> tuple[float, float]:
    """Mean over independent chains and its SE."""
    b, s = np.asarray(bias), np.asarray(se)
    return float(b.mean()), float(np.sqrt((s ** 2).sum()) / len(s))


# -- the samplers, tuned -------------------------------------------------------------------------
def leapfrog_steps(dt: float) -> int:
    return max(1, round(TRAJECTORY_TIME / dt))


def tune_dual_averaging(method: str, log_prob: Counted, x: Tensor, budget: int, seed: int) -> dict:
    """dt of RT / HMC trajectories (+ Metropolis) by dual averaging towards acceptance 0.8,
    one trajectory at a time while the tuning budget lasts; returns the averaged dt."""
    log_dt, mu = math.log(DA_DT0), math.log(10 * DA_DT0)
    h_bar = log_dt_bar = 0.0
    accepted, t = [], 0
    while True:
        n = leapfrog_steps(math.exp(log_dt))
        if log_prob.calls + n + 1 > budget:  # a call: 1 gradient at its start + 1 per leapfrog
            break
        with np.errstate(all="ignore"):  # a diverging trajectory is rejected; no warning
            res = rtllm.sample_trajectories(log_prob, x, n_samples=1, n_leapfrog=n, dt=math.exp(log_dt),
                                            method=method, seed=seed * 1_000_003 + t)
        x = res.samples[-1]
        acc = float(res.accepted.double().mean())
        accepted.append(acc)
        t += 1
        h_bar += ((ACCEPT_TARGET - acc) - h_bar) / (t + DA_T0)
        log_dt = mu - math.sqrt(t) / DA_GAMMA * h_bar
        eta = t ** -DA_KAPPA
        log_dt_bar = eta * log_dt + (1 - eta) * log_dt_bar
    dt = math.exp(log_dt_bar) if t else DA_DT0
    return {"dt": dt, "n_leapfrog": leapfrog_steps(dt), "tuning_trajectories": t,
            "tuning_accept": float(np.mean(accepted)) if accepted else math.nan}


def run_trajectory_sampler(method: str, target: Target, x0: Tensor, budget: int, seed: int) -> Run:
    """RT ('ray') or HMC ('hmc') trajectories with Metropolis, each chain tuned on its own."""
    run, t0 = Run(method, target.name), time.perf_counter()
    for c in range(len(x0)):
        lp = Counted(target.log_prob)
        tuned = tune_dual_averaging(method, lp, x0[c:c + 1], int(TUNE_SHARE * budget), seed + c)
        n = tuned["n_leapfrog"]
        lp2 = Counted(target.log_prob)
        with np.errstate(all="ignore"):
            res = rtllm.sample_trajectories(lp2, x0[c:c + 1], n_samples=max(1, (budget - lp.calls - 1) // n),
                                            n_leapfrog=n, dt=tuned["dt"], method=method, seed=seed + c)
        tuned["accept"] = float(res.accept_rate[0])
        run.add(chain_stats(res.samples, target, res.log_prob), 0, tuned, lp.calls, lp2.calls)
    run.seconds = time.perf_counter() - t0
    return run


def mclmc_phases(full_steps: int) -> tuple[int, int, int]:
    """MILE's 40k/5k/5k proportions (80/10/10%) of the tuning budget's full steps."""
    two = three = full_steps // 10
    return full_steps - two - three, two, three


def run_mclmc(target: Target, x0: Tensor, budget: int, seed: int) -> Run:
    """MCLMC, every chain tuned alone by rtllm.tune_mclmc (MILE's phases on the tuning budget),
    then sampled from x0 with its tuned step size and L."""
    run, t0 = Run("mclmc", target.name), time.perf_counter()
    lp = Counted(target.log_prob)
    chains = MCLMCChains(lp, x0, step_size=MCLMC_EPS0_PER_SQRT_D * math.sqrt(target.dim),
                         L=max(math.sqrt(target.dim), 15.0), seed=seed)
    p1, p2, p3 = mclmc_phases((int(TUNE_SHARE * budget) - 1) // 2)
    with np.errstate(all="ignore"):  # a diverging chain is restored by MCLMCChains
        eps, L, info = rtllm.tune_mclmc(chains, phase1=p1, phase2=p2, phase3=p3, seed=seed)
    lp2 = Counted(target.log_prob)
    n_full = (budget - lp.calls - 1) // 2
    res = MCLMCChains(lp2, x0, step_size=eps, L=L, seed=seed + 1).run(
        n_full, thin=thinning(n_full))
    stats = chain_stats(res.samples, target)
    energy = res.energy_change[int(BURN_IN_SHARE * n_full):]
    for c in range(len(x0)):
        tuned = {"step_size": float(eps[c]), "L": float(L[c]), "phases": [p1, p2, p3],
                 "divergences": int(info.divergences[c] + res.diverged[:, c].sum()),
                 "energy_var_per_dim": float(np.nanmean(energy[:, c] ** 2) / target.dim)}
        run.add(stats, c, tuned, lp.calls, lp2.calls)
    run.seconds = time.perf_counter() - t0
    return run


def run_sgld(target: Target, x0: Tensor, budget: int, seed: int) -> Run:
    """SGLD: per chain, SGLD_GRID from the largest dt down, each run from the chain's exact start
    draw on 1/len(grid) of the tuning budget; the first dt whose |bias| < SGLD_MAX_BIAS is
    taken (the smallest if none passes), then the chain is sampled from its start draw.

    This is "the step size maximizing ESS per gradient subject to the bias bound": Langevin's
    autocorrelation times fall as dt grows below its stability limit (tau_i ~ 2 sigma_i^2 / dt^2
    on a Gaussian), and ESS itself cannot be resolved on runs this short. The bias is that of
    the per-coordinate second moments, mean over the run's second half of y = mean_i x_i^2 /
    E[x_i^2] minus y at the start: the start is an exact draw (E y = 1), so this is unbiased,
    and the start's own sampling noise cancels while the chain is still near it.
    """
    run, t0 = Run("sgld", target.name), time.perf_counter()
    per_dt = int(TUNE_SHARE * budget) // len(SGLD_GRID)
    chosen, tunes = [], []
    for c in range(len(x0)):
        lp = Counted(target.log_prob)
        start = float((x0[c] ** 2 / torch.from_numpy(target.second_moment)).mean())
        tried = {}
        for dt in sorted(SGLD_GRID, reverse=True):
            draws = run_step_form("sgld", lp, x0[c:c + 1], dt=dt, steps=per_dt, thin=1, seed=seed + 7 * c)
            with np.errstate(all="ignore"):
                y = (draws[len(draws) // 2:, 0] ** 2 / torch.from_numpy(target.second_moment)).mean(-1)
            tried[dt] = float(y.mean()) - start
            if abs(tried[dt]) < SGLD_MAX_BIAS:  # nan fails too
                break
        passed = abs(tried[dt]) < SGLD_MAX_BIAS
        chosen.append(dt if passed else min(SGLD_GRID))
        tunes.append({"dt": chosen[-1], "passed": passed, "grads": lp.calls,
                      "grid_bias_coord": {f"{k:g}": round(v, 4) for k, v in tried.items()}})
    for c, tuned in enumerate(tunes):  # one run per chain: each spends the rest of its own budget
        lp2 = Counted(target.log_prob)
        steps = budget - tuned["grads"]
        draws = run_step_form("sgld", lp2, x0[c:c + 1], dt=chosen[c], steps=steps,
                              thin=thinning(steps), seed=seed + 7 * c + 1)
        run.add(chain_stats(draws, target), 0, tuned, tuned.pop("grads"), lp2.calls)
    run.seconds = time.perf_counter() - t0
    return run


def run_exact(sampler: str, target: Target, x0: Tensor, budget: int, seed: int) -> Run:
    """Part 1 for one sampler: tune on TUNE_SHARE of `budget` gradients per chain, sample on the rest."""
    if sampler in ("ray", "hmc"):
        return run_trajectory_sampler(sampler, target, x0, budget, seed)
    return run_mclmc(target, x0, budget, seed) if sampler == "mclmc" else run_sgld(target, x0, budget, seed)


# -- noisy gradients -----------------------------------------------------------------------------
def run_noisy(sampler: str, target: Target, x0: Tensor, tuned: list[dict], sigmas: list[float],
              steps: int, seed: int) -> dict[float, tuple[float, float]]:
    """Bias of E|x|^2 (mean over chains, SE) per gradient-noise sigma, `steps` gradients per
    chain with the values tuned on exact gradients; RT and HMC in the step (optimizer) form."""
    k, chains = len(sigmas), len(x0)
    sig = torch.tensor(sigmas * chains, dtype=torch.float64)  # chain c, sigma j at c * k + j
    xs = x0.repeat_interleave(k, 0)
    thin = thinning(steps)
    if sampler in ("ray", "hmc"):  # a partial refresh needs one dt per run: one run per chain
        draws = torch.cat([run_step_form(sampler, NoisyGradient(target.log_prob, sig[c * k:(c + 1) * k], seed + c),
                                         xs[c * k:(c + 1) * k], dt=tuned[c]["dt"], steps=steps, thin=thin,
                                         seed=seed + 100 + c) for c in range(chains)], 1)
    elif sampler == "sgld":
        dt = np.repeat([t["dt"] for t in tuned], k)
        draws = run_step_form("sgld", NoisyGradient(target.log_prob, sig, seed), xs, dt=dt, steps=steps,
                              thin=thin, seed=seed + 100)
    else:
        eps = np.repeat([t["step_size"] for t in tuned], k)
        L = np.repeat([t["L"] for t in tuned], k)
        draws = MCLMCChains(NoisyGradient(target.log_prob, sig, seed), xs, step_size=eps, L=L,
                            seed=seed + 100).run(steps // 2, thin=thinning(steps // 2)).samples
    stats = chain_stats(draws, target, ess=False)
    return {s: combine(stats["bias"][j::k], stats["bias_se"][j::k]) for j, s in enumerate(sigmas)}
