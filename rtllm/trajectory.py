"""Trajectory form with Metropolis, for log-density functions: small models and tests.

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

from rtllm import rules

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
