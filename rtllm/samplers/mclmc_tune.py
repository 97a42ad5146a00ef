"""Tuning MCLMC's step size and decoherence length L as MILE does (algorithms.md section 3).

Phases I + II (MILE: 40k + 5k full steps): the step size is adapted so that the energy change
per full step has Var[dE]/D near a target that falls linearly over the two phases. The default
schedule, "unbiased" (1e-4 -> 2e-6), keeps the battery of Gaussians and Rosenbrock pairs in
tests/samplers/test_mclmc_bias.py unbiased within 2 standard errors; MILE's own schedule,
"mile" (0.5 -> 0.1), ends at the integrator's stability edge and is biased: E|x|^2 2.7% low on
a 100-d Gaussian (z = -30), Rosenbrock E|x|^2 30% low (docs/sampling.md, "MCLMC: the tuner's
target"). MCLMC is unadjusted: its bias shrinks like eps^2, so with the energy error ~ eps^6
it falls only as target^(1/3), which is why the unbiased target is so small. Phase II also
accumulates the variance of every coordinate (or of a random subset), and L = sqrt(their sum).
Phase III (MILE: 5k): L = 0.4 * eps * mean(N/ESS) over ~2000 random coordinates, N/ESS being
each coordinate's integrated autocorrelation time in full steps (Sokal's window,
`rtllm.evaluation.diagnostics`). One implementation drives both forms: an `rtllm.MCLMC` optimizer with a
closure that computes the loss and its gradient, or `rtllm.samplers.trajectory.MCLMCChains` (each
chain tuned on its own, as MILE tunes each ensemble member).

Step-size rule. The McLachlan integrator's energy error per step has Var[dE] ~ C * D * eps^6.
Each step gives an estimate dE^2 / (D eps^6) of C; they are averaged with exponential decay
(an effective window of `num_effective_samples` steps) and weights that discount readings far
from the target (MILE/blackjax's trust weight exp(-(ln xi / (6 trust))^2 / 2), xi = dE^2 /
(D target)), and eps = (target / C)^(1/6). Averaging C rather than blackjax's xi / eps^6 (in
which the target sits inside the average) makes the step size follow the *current* target of a
moving schedule instead of lagging it by ~num_effective_samples/2 steps -- which matters when
the phases are scaled down -- and is the same rule for a constant target. A divergence (the
sampler reverts it) caps eps at 0.8 x the step size that diverged, for the rest of the tuning.

Memory: phase II keeps a float64 mean and second moment per tracked coordinate (16 bytes
each). All coordinates of GPT-2 1.5B would be 25 GB, so by default at most 2^20 random
coordinates are tracked and the sum is scaled by D / k (relative error ~ CV(variances) /
sqrt(k)); `variance_coords=None` tracks all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from rtllm.samplers.autocorr import integrated_autocorr_time
from rtllm.samplers.mclmc import MCLMC
from rtllm.samplers.trajectory import MCLMCChains, StepReport

DIVERGENCE_BACKOFF = 0.8  # eps cap after a divergence, relative to the step size that diverged
# Var[dE]/D schedules (start, end) by name; see the module docstring for the bias of each.
TARGET_VAR_SCHEDULES: dict[str, tuple[float, float]] = {"unbiased": (1e-4, 2e-6), "mile": (0.5, 0.1)}
DEFAULT_TARGET_VAR = "unbiased"


@dataclass
class TuneInfo:
    """Diagnostics of a tuning run; arrays have a trailing [units] axis (1 for an optimizer)."""

    energy_change: np.ndarray  # [phase1 + phase2, units] per full step (nan: none finished)
    target_var: np.ndarray  # [phase1 + phase2] the target Var[dE]/D at each step
    step_size: np.ndarray  # [phase1 + phase2, units] the step size after each step's update
    L_phase2: np.ndarray  # [units] sqrt(sum of variances)
    L_phase3: np.ndarray  # [units] 0.4 * eps * mean(N/ESS)
    autocorr_time: np.ndarray  # [units] mean integrated autocorrelation time, phase III (steps)
    divergences: np.ndarray  # [units]
    variance_coords: int  # coordinates tracked in phase II
    ess_coords: int  # coordinates whose ESS phase III measured


class _OptimizerTarget:
    """An MCLMC optimizer + closure seen as one chain: full steps, coordinates, eps and L."""

    def __init__(self, sampler: MCLMC, closure: Callable[[], Tensor]) -> None:
        self.sampler, self.closure = sampler, closure
        self.num_chains, self.dim = 1, sampler.num_params

    @property
    def step_size(self) -> np.ndarray:
        return np.array([self.sampler.step_size])

    @step_size.setter
    def step_size(self, value) -> None:
        self.sampler.step_size = float(np.asarray(value).reshape(-1)[0])

    @property
    def L(self) -> np.ndarray:
        return np.array([self.sampler.L])

    @L.setter
    def L(self, value) -> None:
        self.sampler.L = float(np.asarray(value).reshape(-1)[0])

    def full_step(self) -> StepReport:
        """step() calls up to the next step boundary (two, unless one diverged)."""
        energy, eps, diverged = math.nan, math.nan, False
        while True:
            if self.sampler.step(self.closure) is None:
                raise ValueError("the closure must return the loss: MCLMC's energy change, which "
                                 "the step size is tuned on, needs it")
            diverged |= self.sampler.diverged
            if self.sampler.last_step_size is not None:
                eps = self.sampler.last_step_size
                e = self.sampler.last_energy_change
                energy = math.nan if e is None else e
            if self.sampler.phase == "start":
                break
        return StepReport(np.array([energy]), np.array([eps]), np.array([diverged]))

    @torch.no_grad()
    def read(self, indices: np.ndarray) -> np.ndarray:
        parts = []
        for shard in self.sampler.shards:
            lo, hi = np.searchsorted(indices, [shard.offset, shard.offset + shard.numel])
            if hi > lo:
                local = torch.as_tensor(indices[lo:hi] - shard.offset, device=shard.x.device)
                parts.append(shard.x[local].double().cpu())
        return torch.cat(parts).numpy()[None, :]


def _check_count(name: str, value, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _coordinates(rng: np.random.Generator, dim: int, k: int | None) -> np.ndarray:
    """Sorted global indices of k random coordinates (all of them when k is None or >= dim)."""
    if k is None or k >= dim:
        return np.arange(dim)
    return np.sort(rng.choice(dim, size=k, replace=False))


def resolve_target_var(target_var: tuple[float, float] | str) -> tuple[float, float]:
    """A (start, end) Var[dE]/D schedule from a pair or a name in TARGET_VAR_SCHEDULES."""
    if isinstance(target_var, str):
        if target_var not in TARGET_VAR_SCHEDULES:
            raise ValueError(f"target_var must be one of {', '.join(TARGET_VAR_SCHEDULES)} or a "
                             f"(start, end) pair, got {target_var!r}")
        return TARGET_VAR_SCHEDULES[target_var]
    if not isinstance(target_var, (tuple, list)) or len(target_var) != 2:
        raise ValueError(f"target_var must be a (start, end) pair or a schedule name, got {target_var!r}")
    return tuple(target_var)


def tune_mclmc(target: MCLMC | MCLMCChains, closure: Callable[[], Tensor] | None = None, *,
               phase1: int = 40_000, phase2: int = 5_000, phase3: int = 5_000,
               target_var: tuple[float, float] | str = DEFAULT_TARGET_VAR, initial_L: float | None = None,
               num_effective_samples: float = 150.0, trust_in_estimate: float = 1.5,
               variance_coords: int | None = 2**20, ess_coords: int = 2000, L_factor: float = 0.4,
               seed: int = 0):
    """Tune step size and L as MILE does; returns (step_size, L, TuneInfo).

    target: an `rtllm.MCLMC` (then `closure` must zero the gradients, compute the loss,
    backpropagate it and return it) or an `MCLMCChains`. The start step size is the target's
    current one (MILE: the optimizer's learning rate); L starts at `initial_L` (default
    max(sqrt(D), 15)). target_var: the Var[dE]/D schedule (start, end) of phases I + II, or a
    name in TARGET_VAR_SCHEDULES ("unbiased", the default, or MILE's "mile"). Phase lengths
    count full steps (two gradients each). The target is left
    at the tuned state with the tuned step size and L. For an optimizer the results are floats,
    for chains [chains] arrays. `seed` picks the tracked coordinates.
    """
    if isinstance(target, MCLMC):
        if closure is None:
            raise ValueError("tuning an MCLMC optimizer needs a closure that computes the loss, "
                             "backpropagates it and returns it")
        t = _OptimizerTarget(target, closure)
    elif isinstance(target, MCLMCChains):
        if closure is not None:
            raise ValueError("MCLMCChains evaluates its own log density: pass no closure")
        t = target
    else:
        raise TypeError(f"target must be an rtllm.MCLMC or an MCLMCChains, got {type(target).__name__}")
    for name, value, minimum in (("phase1", phase1, 0), ("phase2", phase2, 0), ("phase3", phase3, 0),
                                 ("ess_coords", ess_coords, 1)):
        _check_count(name, value, minimum)
    if variance_coords is not None:
        _check_count("variance_coords", variance_coords, 1)
    start_var, end_var = resolve_target_var(target_var)
    for name, value in (("target_var", start_var), ("target_var", end_var),
                        ("num_effective_samples", num_effective_samples),
                        ("trust_in_estimate", trust_in_estimate), ("L_factor", L_factor)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    dim, units = t.dim, t.num_chains
    t.L = initial_L if initial_L is not None else max(math.sqrt(dim), 15.0)
    rng = np.random.default_rng(seed)

    # -- phases I + II: step size; phase II also the variances ----------------------------------
    n12 = phase1 + phase2
    decay = (num_effective_samples - 1.0) / (num_effective_samples + 1.0)
    weight_sum, c_sum = np.zeros(units), np.zeros(units)
    eps_cap = np.full(units, np.inf)
    var_idx = _coordinates(rng, dim, variance_coords)
    w_total, mean, m2 = np.zeros(units), np.zeros((units, len(var_idx))), np.zeros((units, len(var_idx)))
    targets = start_var + (end_var - start_var) * np.arange(n12) / max(n12 - 1, 1)
    energies, eps_trace = np.full((n12, units), np.nan), np.zeros((n12, units))
    divergences = np.zeros(units, dtype=np.int64)
    for i in range(n12):
        eps_now = t.step_size
        report = t.full_step()
        energy, eps_used, div = report.energy_change, report.step_size, report.diverged
        energies[i] = energy
        divergences += div
        ok = np.isfinite(energy) & ~div
        with np.errstate(all="ignore"):
            xi = energy**2 / (dim * targets[i]) + 1e-8  # 1e-8: a zero reading stays finite in log
            w = np.where(ok, np.exp(-0.5 * (np.log(xi) / (6.0 * trust_in_estimate)) ** 2), 0.0)
            c_sum = decay * c_sum + np.where(ok, w * energy**2 / (dim * eps_used**6), 0.0)
            weight_sum = decay * weight_sum + w
            eps_cap = np.where(div, np.minimum(eps_cap, DIVERGENCE_BACKOFF * eps_now), eps_cap)
            eps_new = np.where(c_sum > 0, (targets[i] * weight_sum / c_sum) ** (1 / 6), eps_now)
        eps_new = np.minimum(eps_new, eps_cap)
        t.step_size = eps_new
        eps_trace[i] = eps_new
        if i >= phase1:
            # Weighted Welford (West 1979) of the position after this full step, weighted by the
            # step size that moved it there (eps_now, latched at its start): a time average.
            w_pos = np.where(div, 0.0, eps_now)[:, None]
            x = t.read(var_idx)
            w_total = w_total + w_pos[:, 0]
            frac = np.divide(w_pos, w_total[:, None], out=np.zeros_like(w_pos), where=w_total[:, None] > 0)
            d = x - mean
            mean = mean + frac * d
            m2 = m2 + w_pos * d * (x - mean)
    L2 = t.L
    if phase2 > 1:
        variances = m2 / np.maximum(w_total, 1e-300)[:, None]
        L2 = np.sqrt(variances.sum(1) * dim / len(var_idx))
        t.L = np.where(np.isfinite(L2) & (L2 > 0), L2, t.L)

    # -- phase III: L from the autocorrelation times ------------------------------------------
    L3, tau_mean = t.L, np.full(units, np.nan)
    if phase3 > 1:
        ess_idx = _coordinates(rng, dim, ess_coords)
        trace = np.empty((phase3, units, len(ess_idx)))
        for i in range(phase3):
            report = t.full_step()
            divergences += report.diverged
            trace[i] = t.read(ess_idx)
        taus = np.array([[integrated_autocorr_time(trace[:, u, j]) for j in range(len(ess_idx))]
                         for u in range(units)])
        # tau < 1 (Sokal's estimate of an antithetic or period-2 coordinate, even negative)
        # would credit more effective samples than steps and shrink L without bound: at least 1.
        with np.errstate(all="ignore"):
            tau_mean = np.nanmean(np.where(np.isfinite(taus), np.maximum(taus, 1.0), np.nan), axis=1)
        L3 = L_factor * t.step_size * tau_mean
        t.L = np.where(np.isfinite(L3) & (L3 > 0), L3, t.L)

    info = TuneInfo(energy_change=energies, target_var=targets, step_size=eps_trace,
                    L_phase2=np.asarray(L2, dtype=np.float64), L_phase3=np.asarray(L3, dtype=np.float64),
                    autocorr_time=tau_mean, divergences=divergences, variance_coords=len(var_idx),
                    ess_coords=len(ess_idx) if phase3 > 1 else 0)
    if isinstance(t, _OptimizerTarget):
        return float(t.step_size[0]), float(t.L[0]), info
    return t.step_size, t.L, info
