"""The walk of "Walking on the fiber" (Reichlin, Vasco, Kragic 2025) as an optimizer over flat buffers.

A reconstruction (docs/fiber.md says which parts are the paper's): particle i starts at the
optimum and repeats

    x <- x + eta * (beta * d_i - grad loss(x)),

d_i a fixed random unit direction of particle i, so the drift slides it along the fiber (the
set of near-optimal weights) while the gradient holds it near the minimum. d_i is never
stored: it is the Philox normal vector keyed on (seed, particle) -- the refresh noise of the
shared kernels with `step` = particle and a stream of its own -- normalized with the norm the
reduce pass sums. `tangent=True` removes d_i's component along the gradient (tangent drift):
d = n/|n| - (n.g)/(|n| |g|^2) g, from the same six sums. One reduce pass and one update pass per
step, as for every sampler here; the velocity buffer holds the step's direction.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from rtllm.samplers import rules
from rtllm.samplers.optimizers import FlatSampler

# Philox stream of the drift directions (0: initial velocity, 1: refresh noise; rtllm/kernels/philox.py).
STREAM_FIBER_DRIFT = 2


def _positive(name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


class FiberWalk(FlatSampler):
    """Drift-plus-gradient walk of one particle at a time over the model's parameters.

    Args: lr eta (step size of the update), drift beta (length of the drift per unit of eta; the
    drift moves x by eta * beta per step), particle i (selects d_i; `particle` is settable, so
    one walker serves particles in turn), seed, tangent, backend, prior_scale / prior_center (a
    Gaussian prior: the loss is then L = loss - ln p(theta) / S, S = scale_likelihood). All
    parameters form one direction (ray='model'). `step(drift=False)` takes a plain gradient step
    (the pull-back towards the fiber).
    """

    min_ray_dim = 2

    def __init__(self, params, *, lr: float, drift: float, particle: int = 0, seed: int = 0,
                 tangent: bool = False, **kwargs) -> None:
        if "ray" in kwargs or "dt" in kwargs:
            raise TypeError("FiberWalk takes lr and drift; its direction spans all parameters")
        self.lr = _positive("lr", lr)
        self.drift = _positive("drift", drift, allow_zero=True)
        self.tangent = bool(tangent)
        super().__init__(params, dt=self.lr, seed=seed, ray="model", refresh_rate=0.0, **kwargs)
        self.particle = particle

    @property
    def particle(self) -> int:
        return self._particle

    @particle.setter
    def particle(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
            raise ValueError(f"particle must be an int in [0, 2**62), got {value!r}")
        self._particle = value

    def _drift_key(self, noise: bool) -> dict:
        return dict(seed=self.seed, step=self._particle, stream=STREAM_FIBER_DRIFT, noise=noise)

    def coefficients(self, sums: rules.Array, drift: bool) -> rules.Coefficients:
        """v_new = beta_g * g + gamma * n, x += lr * v_new, from the sums (float64)."""
        vv, gg, vg, nn, nv, ng = np.moveaxis(np.asarray(sums, dtype=np.float64), -1, 0)
        zero = np.zeros_like(gg)
        beta_g = np.full_like(gg, -1.0)
        gamma = zero
        if drift and self.drift > 0:
            gamma = self.drift / np.sqrt(nn)
            if self.tangent:
                with np.errstate(all="ignore"):
                    beta_g = beta_g - np.where(gg > 0, gamma * ng / gg, 0.0)
        return rules.Coefficients(alpha=zero, beta=beta_g, gamma=gamma, delta=self.lr, d_ln_lum=zero)

    @torch.no_grad()
    def step(self, closure=None, *, drift: bool = True):
        """One walk step from the gradient in the buffer (or the closure's). Returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._collect_gradient()
        key = self._drift_key(noise=drift and self.drift > 0)
        sums = self._reduce(key)
        self._step += 1
        if not np.isfinite(sums).all():
            raise FloatingPointError(f"FiberWalk: non-finite gradient at step {self._step - 1} of particle "
                                     f"{self._particle}; lower lr or check the loss")
        coef = self.coefficients(sums, drift)
        self._update(coef, key)
        self.last_info = {"grad_norm": float(np.sqrt(sums[:, rules.GG].sum()))}
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["fiber"] = {"particle": self._particle, "lr": self.lr, "drift": self.drift, "tangent": self.tangent}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        fiber = state["fiber"]
        self._particle, self.lr, self.drift, self.tangent = (fiber["particle"], fiber["lr"], fiber["drift"],
                                                             fiber["tangent"])
