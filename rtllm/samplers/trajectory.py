"""Trajectory forms for log-density functions (small models and tests): ray tracing or HMC
trajectories with Metropolis, and MCLMC chains (`MCLMCChains`, `sample_mclmc`).

Each trajectory fully refreshes the velocity, runs `n_leapfrog` steps of the same schedule the
optimizers use (first, steady..., closing: n_leapfrog + 1 gradients), and accepts the end point
with probability min(1, exp(ln p(x1) - ln p(x0) - d_ln_lum)). Many independent chains run at
once along a leading batch dimension; the scalar rules broadcast over it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from rtllm.samplers import rules
from rtllm.samplers.mclmc import MCLMCRule, positive_values

_KICKS = {"ray": rules.ray_kick, "hmc": rules.hmc_kick}


@dataclass
class TrajectoryResult:
    samples: Tensor  # [n_samples, chains, D]: the chain state after each trajectory
    log_prob: Tensor  # [n_samples, chains]
    accepted: Tensor  # [n_samples, chains] bool

    @property
    def accept_rate(self) -> Tensor:
        """Fraction of accepted trajectories per chain."""
        return self.accepted.double().mean(0)


def _log_prob_and_grad(log_prob: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        lp = log_prob(xg)
        if lp.shape != x.shape[:1]:
            raise ValueError(f"log_prob must return one value per chain, shape {tuple(x.shape[:1])}, "
                             f"got {tuple(lp.shape)}")
        (grad,) = torch.autograd.grad(lp.sum(), xg)
    return lp.detach(), grad


@torch.no_grad()
def sample_trajectories(
    log_prob: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    n_samples: int,
    n_leapfrog: int,
    dt: float,
    method: str = "ray",
    refresh_rate: float = 0.0,
    mom_norm: float = 1.0,
    seed: int = 0,
) -> TrajectoryResult:
    """Sample exp(log_prob) with ray tracing ('ray') or HMC ('hmc') trajectories + Metropolis.

    x0: [chains, D] starting points (use float64 for tests). log_prob maps [chains, D] to
    [chains]. dt is the time step (path time per leapfrog step).
    """
    if method not in _KICKS:
        raise ValueError(f"method must be 'ray' or 'hmc', got {method!r}")
    if x0.dim() != 2:
        raise ValueError(f"x0 must be [chains, D], got shape {tuple(x0.shape)}")
    chains, dim = x0.shape
    if method == "ray" and dim < 2:
        raise ValueError(f"ray tracing needs D >= 2 dimensions, got D = {dim}; use method='hmc'")
    if method == "hmc" and mom_norm != 1.0:
        raise ValueError(f"mom_norm must be 1 for HMC (unit mass), got {mom_norm!r}")
    for name, value in (("n_samples", n_samples), ("n_leapfrog", n_leapfrog)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating-point tensor (float64 for tests), got {x0.dtype}")
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
    if not (math.isfinite(mom_norm) and mom_norm > 0):
        raise ValueError(f"mom_norm must be a finite number > 0, got {mom_norm!r}")
    if not refresh_rate >= 0:  # also refuses NaN; inf means a full refresh every step
        raise ValueError(f"refresh_rate must be >= 0, got {refresh_rate!r}")

    gen = torch.Generator(device=x0.device).manual_seed(seed)
    kick = _KICKS[method]
    dims = np.full(chains, float(dim))
    x = x0.clone()
    lp, grad = _log_prob_and_grad(log_prob, x)
    out_x = torch.empty(n_samples, chains, dim, dtype=x.dtype, device=x.device)
    out_lp = torch.empty(n_samples, chains, dtype=lp.dtype, device=x.device)
    out_acc = torch.empty(n_samples, chains, dtype=torch.bool, device=x.device)
    for t in range(n_samples):
        x_start, lp_start, grad_start = x.clone(), lp.clone(), grad.clone()
        v = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device) * mom_norm
        ln_lum = torch.zeros(chains, dtype=torch.float64, device=x.device)
        g = -grad  # gradient of the loss -ln p
        for i in range(n_leapfrog + 1):
            phase = "first" if i == 0 else "closing" if i == n_leapfrog else "steady"
            schedule = rules.step_schedule(phase, dt, refresh_rate)
            n = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device) \
                if rules.needs_noise(schedule) else torch.zeros_like(x)
            vd, gd, nd = v.double(), g.double(), n.double()
            sums = torch.stack([(vd * vd).sum(-1), (gd * gd).sum(-1), (vd * gd).sum(-1),
                                (nd * nd).sum(-1), (nd * vd).sum(-1), (nd * gd).sum(-1)], -1)
            coef = rules.compose(schedule, sums.cpu().numpy(), kick=kick, scale=1.0, dim=dims,
                                 refresh_rate=refresh_rate, mom_norm=mom_norm)
            col = lambda c: torch.from_numpy(c).to(x).unsqueeze(-1)  # noqa: E731
            v = col(coef.alpha) * v + col(coef.beta) * g + col(coef.gamma) * n
            ln_lum += torch.from_numpy(coef.d_ln_lum).to(ln_lum)
            if coef.delta:
                x = x + coef.delta * v
                lp, grad = _log_prob_and_grad(log_prob, x)
                g = -grad
        log_accept = torch.nan_to_num(lp.double() - lp_start.double() - ln_lum, nan=-torch.inf)
        u = torch.rand(chains, generator=gen, dtype=torch.float64, device=x.device)
        accept = torch.log(u) < log_accept
        x = torch.where(accept.unsqueeze(-1), x, x_start)
        lp = torch.where(accept, lp, lp_start)
        grad = torch.where(accept.unsqueeze(-1), grad, grad_start)
        out_x[t], out_lp[t], out_acc[t] = x, lp, accept
    return TrajectoryResult(samples=out_x, log_prob=out_lp, accepted=out_acc)


# ------------------------------------------------------------------------------------ MCLMC
@dataclass(frozen=True)
class StepReport:
    """What one full MCLMC step of every chain reports (float64 [chains] arrays)."""

    energy_change: np.ndarray  # of the full step finished in it (nan: none, or unknown)
    step_size: np.ndarray  # the step size that finished step used (nan: none)
    diverged: np.ndarray  # bool: the chain hit a non-finite log density and was restored


@dataclass
class MCLMCResult:
    samples: Tensor  # [n_steps // thin, chains, D]: positions at full-step boundaries
    energy_change: np.ndarray  # [n_steps, chains] float64 (nan: no finished step, or diverged)
    diverged: np.ndarray  # [n_steps, chains] bool


class MCLMCChains:
    """MCLMC for log-density functions, many independent chains at once (float64 torch).

    The same scalar rules and phase machine as the optimizer `rtllm.MCLMC` (ln p = log_prob,
    S = 1), one unit velocity per chain, per-chain step_size and L ([chains] arrays, or scalars).
    `full_step()` advances every chain by one full step (two gradients). A chain whose log
    density or gradient turns non-finite is restored to its state before that full step (a
    copy is cheap here), reported in `diverged`, and retries it on the next call.
    """

    def __init__(self, log_prob: Callable[[Tensor], Tensor], x0: Tensor, *, step_size, L,
                 seed: int = 0) -> None:
        if x0.dim() != 2:
            raise ValueError(f"x0 must be [chains, D], got shape {tuple(x0.shape)}")
        if not x0.is_floating_point():
            raise ValueError(f"x0 must be a floating-point tensor (float64 for tests), got {x0.dtype}")
        self.num_chains, self.dim = x0.shape
        if self.dim < 2:
            raise ValueError(f"MCLMC needs D >= 2 dimensions (a unit velocity), got D = {self.dim}")
        self.step_size, self.L = step_size, L  # validated by the setters
        self.log_prob = log_prob
        self._gen = torch.Generator(device=x0.device).manual_seed(seed)
        self.x = x0.clone()
        self.lp, self.grad = _log_prob_and_grad(log_prob, self.x)
        if not (torch.isfinite(self.lp).all() and torch.isfinite(self.grad).all()):
            raise ValueError("log_prob or its gradient is not finite at x0; start where the "
                             "density is positive")
        u = torch.randn(self.x.shape, generator=self._gen, dtype=self.x.dtype, device=self.x.device)
        self.u = u / u.norm(dim=-1, keepdim=True)  # uniform on the sphere
        self._dims = np.full(self.num_chains, float(self.dim))
        self._rule = MCLMCRule((self.num_chains,))

    def _per_chain(self, name: str, value) -> np.ndarray:
        arr = positive_values(name, value)
        if arr.ndim > 1 or arr.size not in (1, self.num_chains):
            raise ValueError(f"{name} must be a scalar or one value per chain ({self.num_chains}), "
                             f"got shape {arr.shape}")
        return np.broadcast_to(arr.reshape(-1), (self.num_chains,)).copy()

    @property
    def step_size(self) -> np.ndarray:
        """Per-chain step size of a full step; a change takes effect at the next step."""
        return self._eps.copy()

    @step_size.setter
    def step_size(self, value) -> None:
        self._eps = self._per_chain("step_size", value)

    @property
    def L(self) -> np.ndarray:
        return self._L.copy()

    @L.setter
    def L(self, value) -> None:
        self._L = self._per_chain("L", value)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Coordinates `indices` of every chain: float64 [chains, k] (for the tuner)."""
        return self.x[:, torch.as_tensor(indices, device=self.x.device)].double().cpu().numpy()

    def _call(self) -> tuple[np.ndarray, np.ndarray]:
        """One gradient: the rule's operations for the current phase, then the new log density."""
        g = -self.grad  # gradient of the "loss" -ln p
        schedule = self._rule.schedule(self._eps)
        n = torch.randn(self.x.shape, generator=self._gen, dtype=self.x.dtype, device=self.x.device) \
            if rules.needs_noise(schedule) else torch.zeros_like(self.x)
        ud, gd, nd = self.u.double(), g.double(), n.double()
        sums = torch.stack([(ud * ud).sum(-1), (gd * gd).sum(-1), (ud * gd).sum(-1),
                            (nd * nd).sum(-1), (nd * ud).sum(-1), (nd * gd).sum(-1)], -1).cpu().numpy()
        with np.errstate(all="ignore"):  # a diverging chain's nan must not warn: it is restored
            coef, closing = self._rule.coefficients(sums, eps=self._eps, L=self._L, scale=1.0, dim=self._dims)
            potential = -self.lp.double().cpu().numpy()
            energy, _, eps_done = self._rule.advance(coef.d_ln_lum, closing, potential, self._eps)

        def col(c):  # per-chain scalars as a [chains, 1] column
            return torch.from_numpy(np.broadcast_to(c, (self.num_chains,)).copy()).to(self.x).unsqueeze(-1)

        self.u = col(coef.alpha) * self.u + col(coef.beta) * g + col(coef.gamma) * n
        self.x = self.x + col(coef.delta) * self.u
        self.lp, self.grad = _log_prob_and_grad(self.log_prob, self.x)
        return energy, eps_done

    @torch.no_grad()
    def full_step(self) -> StepReport:
        """Advance every chain by one full step (a start call and a mid call)."""
        rule = self._rule
        saved = (self.x, self.u, self.lp, self.grad, rule.eps_open, rule.pending, rule.potential_start)
        energy, eps_done = self._call()  # the start call finishes the previous step
        self._call()
        bad = ~(torch.isfinite(self.lp) & torch.isfinite(self.grad).all(-1)
                & torch.isfinite(self.x).all(-1)).cpu().numpy()
        if bad.any():  # restore those chains; the finished step is reported again on the retry
            keep = torch.from_numpy(bad).to(self.x.device)
            rows = keep.unsqueeze(-1)
            self.x = torch.where(rows, saved[0], self.x)
            self.u = torch.where(rows, saved[1], self.u)
            self.lp = torch.where(keep, saved[2], self.lp)
            self.grad = torch.where(rows, saved[3], self.grad)
            now = (rule.eps_open, rule.pending, rule.potential_start)
            rule.eps_open, rule.pending, rule.potential_start = (
                np.where(bad, old, new) for old, new in zip(saved[4:], now))
            energy, eps_done = np.where(bad, np.nan, energy), np.where(bad, np.nan, eps_done)
        return StepReport(energy_change=energy, step_size=eps_done, diverged=bad)

    def run(self, n_steps: int, *, thin: int = 1) -> MCLMCResult:
        """n_steps full steps; keeps the position after every `thin`-th one."""
        for name, value in (("n_steps", n_steps), ("thin", thin)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        samples = torch.empty(n_steps // thin, self.num_chains, self.dim, dtype=self.x.dtype,
                              device=self.x.device)
        energy = np.empty((n_steps, self.num_chains))
        diverged = np.empty((n_steps, self.num_chains), bool)
        for t in range(n_steps):
            report = self.full_step()
            energy[t], diverged[t] = report.energy_change, report.diverged
            if (t + 1) % thin == 0:
                samples[(t + 1) // thin - 1] = self.x
        return MCLMCResult(samples=samples, energy_change=energy, diverged=diverged)


def sample_mclmc(log_prob: Callable[[Tensor], Tensor], x0: Tensor, *, n_steps: int, step_size, L,
                 seed: int = 0, thin: int = 1) -> MCLMCResult:
    """Sample exp(log_prob) with MCLMC (no Metropolis test: MCLMC is unadjusted; its bias is
    set by the energy error, which `rtllm.tune_mclmc` tunes). x0: [chains, D]."""
    return MCLMCChains(log_prob, x0, step_size=step_size, L=L, seed=seed).run(n_steps, thin=thin)
