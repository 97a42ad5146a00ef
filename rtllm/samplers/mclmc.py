"""Microcanonical Langevin Monte Carlo (MCLMC, the sampler inside MILE) on the shared machinery.

A unit velocity u per ray, the exact ESH velocity update (`rules.esh_kick`), McLachlan's
two-gradient integrator and a partial refresh that decorrelates u over the length L, all as
scalar rules over the same reduce/update passes as the ray tracer (algorithms.md sections 2
and 3). The target is ln p(x) = -S * loss(x) (+ ln prior), as for `RayTracer`.

A full step of size eps consumes two gradients, so it spans two `step()` calls: a *start*
call (gradient at the step's start) and a *mid* call (gradient at its midpoint). The closing
kick of a step and the opening kick of the next share the boundary's gradient and run in the
same start call, with the refresh between them: the two half refreshes of MILE's splitting
U(eps/2) [K D K D K] U(eps/2) that meet at a boundary are merged into one (see
`rules.mclmc_schedule`). The refresh needs one noise vector per call, so the six sums suffice.

`MCLMCRule` is the float64 bookkeeping both forms share (this optimizer and the log-density
chains of `rtllm.samplers.trajectory`): which operations a call runs, which step size the step in
progress latched, and the energy change of each finished full step,
    dE = kinetic change of its three kicks + U(end) - U(start),  U = -ln p.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from rtllm.samplers import rules
from rtllm.samplers.optimizers import FlatSampler

Array = rules.Array
_NEXT = {"start": "mid", "mid": "start", "mid_close": "closing", "closing": "start"}


def positive_values(name: str, value) -> Array:
    """value as float64 (a scalar or per-chain array), or a clear error unless all finite > 0."""
    try:
        arr = None if isinstance(value, bool) else np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.size == 0 or not np.all(np.isfinite(arr)) or not np.all(arr > 0):
        hint = " (a length in parameter space; MILE starts from max(sqrt(D), 15))" if name == "L" else ""
        raise ValueError(f"{name} must be a finite number > 0{hint}, got {value!r}")
    return arr


def check_step_size_and_L(step_size, L) -> None:
    """Clear errors for a bad step size or decoherence length."""
    positive_values("step_size", step_size)
    positive_values("L", L)


class MCLMCRule:
    """Phase machine and energy ledger of MCLMC's full steps, float64 arrays of shape `shape`.

    shape () serves one sampler, (chains,) many independent chains. Phases: 'start' (the
    gradient at a step boundary), 'mid', 'mid_close' (a mid call after which the trajectory
    closes) and 'closing'. eps_open is the step size the step in progress latched at its start
    (0: no step in progress), so changing the step size between calls takes effect at the next
    boundary and every full step is one McLachlan step of one size.
    """

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.shape = shape
        self.phase = "start"
        self.eps_open = np.zeros(shape)
        self.pending = np.zeros(shape)  # kinetic change of the step in progress, so far
        self.potential_start = np.full(shape, np.nan)  # U at its start (nan: unknown)

    @property
    def at_boundary(self) -> bool:
        """Whether the next call's gradient sits at a step boundary (where U is needed)."""
        return self.phase in ("start", "closing")

    def schedule(self, eps) -> rules.Schedule:
        phase = "mid" if self.phase == "mid_close" else self.phase
        return rules.mclmc_schedule(phase, eps, self.eps_open)

    def coefficients(self, sums: Array, *, eps, L, scale: float,
                     dim: Array) -> tuple[rules.Coefficients, Array]:
        """The call's fused-update coefficients, and the kinetic change of its closing kick."""
        schedule = self.schedule(eps)
        kw = dict(kick=rules.esh_kick, scale=scale, dim=dim,
                  refresh_rate=1.0 / np.asarray(L, dtype=np.float64), mom_norm=1.0)
        coef = rules.compose(schedule, sums, **kw)
        if self.at_boundary:  # its first kick closes the previous step: same arithmetic, alone
            closing = rules.compose(schedule[:1], sums, **kw).d_ln_lum
        else:
            closing = np.zeros_like(coef.d_ln_lum)
        return coef, closing

    def advance(self, kinetic, closing, potential, eps, potential_end=None) -> tuple[Array, Array, Array]:
        """Book one call (kinetic changes summed per unit; U at the call's position, nan if
        unknown) and move to the next phase. Returns (energy change, kinetic change, step
        size) of the full step this call finished, nan where it finished none.

        potential_end: U at the call's position on the *finished* step's minibatch, when that
        differs from the new step's (minibatch gradients); default `potential`."""
        nan = np.full(self.shape, np.nan)
        done = (self.eps_open > 0) if self.at_boundary else np.zeros(self.shape, bool)
        end = potential if potential_end is None else potential_end
        energy = np.where(done, self.pending + closing + end - self.potential_start, nan)
        kinetic_done = np.where(done, self.pending + closing, nan)
        eps_done = np.where(done, self.eps_open, nan)
        if self.at_boundary:
            self.pending = np.asarray(kinetic - closing, dtype=np.float64) + np.zeros(self.shape)
            self.potential_start = np.asarray(potential, dtype=np.float64) + np.zeros(self.shape)
            opening = self.phase == "start"
            self.eps_open = np.asarray(eps if opening else 0.0, dtype=np.float64) + np.zeros(self.shape)
        else:
            self.pending = self.pending + kinetic
        self.phase = _NEXT[self.phase]
        return energy, kinetic_done, eps_done

    def rearm(self) -> None:
        """Abandon the step in progress: the next call starts afresh (and closes nothing)."""
        self.eps_open = np.zeros(self.shape)
        self.pending = np.zeros(self.shape)
        self.potential_start = np.full(self.shape, np.nan)
        self.phase = "start"

    def final_step(self) -> None:
        """Close the trajectory: after the current step's mid call if one is due, else now."""
        self.phase = "mid_close" if self.phase in ("mid", "mid_close") else "closing"

    def state_dict(self) -> dict:
        return {"phase": self.phase, "eps_open": self.eps_open.tolist(),
                "pending": self.pending.tolist(), "potential_start": self.potential_start.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.phase = state["phase"]
        for key in ("eps_open", "pending", "potential_start"):
            setattr(self, key, np.asarray(state[key], dtype=np.float64).reshape(self.shape))


def step_losses(closure, loss, end_loss):
    """(loss, end_loss) of a step: given, or what the closure returns (a loss or both)."""
    if closure is not None:
        if loss is not None or end_loss is not None:
            raise ValueError("pass a closure or loss=/end_loss=, not both")
        with torch.enable_grad():
            loss = closure()
        if isinstance(loss, tuple):
            loss, end_loss = loss
    return loss, end_loss


class MCLMC(FlatSampler):
    """Microcanonical Langevin Monte Carlo as a drop-in torch optimizer (MILE's sampler).

    Args: step_size eps (per *full* step; a full step spans two step() calls, one gradient
    each), L (decoherence length of the velocity; MILE starts from max(sqrt(D), 15), and
    `rtllm.tune_mclmc` tunes both), scale_likelihood S (default D) or loss_tolerance (S = D /
    (2 loss_tolerance)), seed, ray ('model': one unit velocity for all parameters, as in MILE
    -- the default here; 'group': one per parameter group), backend, prior_scale /
    prior_center (as RayTracer).

    Pass the loss with `step(loss=...)` (or a closure that returns it) to track the energy:
    after a call that finishes a full step, `last_energy_change` (float64) holds its change
    and `last_energy_change_per_dim` that over D; both are None otherwise. A non-finite
    gradient or loss sets `diverged`, counts in `divergences`, and reverts the last drift
    (x -= d*u: exact up to one fp32 rounding per element, and no extra memory, where a copy
    of x would cost 4 bytes/parameter); the next call then starts a new step from there.
    `param_groups` hold the step size as 'dt' and 1/L as 'refresh_rate' (the shared
    machinery's names); use the `step_size` and `L` properties.
    """

    kick = staticmethod(rules.esh_kick)
    min_ray_dim = 2
    layouts = ("fp32",)  # its drift undo writes shard.x as an fp32 position (rtllm.state.layouts)

    def __init__(self, params, *, step_size: float, L: float, scale_likelihood: float | None = None,
                 loss_tolerance: float | None = None, seed: int = 0, ray: str = "model",
                 backend: str = "auto", prior_scale: float | None = None, prior_center: str = "zero",
                 **kwargs) -> None:
        for name in ("dt", "refresh_rate", "mom_norm"):
            if name in kwargs:
                raise TypeError(f"MCLMC takes step_size and L, not {name} (the velocity is a unit vector)")
        check_step_size_and_L(step_size, L)
        if not math.isfinite(1.0 / L):
            raise ValueError(f"L must be a finite number > 0 whose inverse is finite, got {L!r}")
        super().__init__(params, dt=float(step_size), refresh_rate=1.0 / L, mom_norm=1.0,
                         scale_likelihood=scale_likelihood, loss_tolerance=loss_tolerance, seed=seed,
                         ray=ray, backend=backend, prior_scale=prior_scale,
                         prior_center=prior_center, **kwargs)
        self._normalize_velocity()
        self._rule = MCLMCRule()
        self._last_drift = 0.0
        self.divergences = 0
        self.diverged = False
        self.last_energy_change: float | None = None
        self.last_kinetic_change: float | None = None
        self.last_step_size: float | None = None  # the step size of the step just finished

    @torch.no_grad()
    def _normalize_velocity(self) -> None:
        """The initial draw N(0, I) scaled to |u| = 1 per ray: uniform on each sphere."""
        key = self._noise_key([])  # no noise: only the norms are summed
        vv = self._reduce(key)[:, rules.VV]
        zero = np.zeros_like(vv)
        self._update(rules.Coefficients(alpha=1.0 / np.sqrt(vv), beta=zero, gamma=zero, delta=0.0,
                                        d_ln_lum=zero), key)

    # -- hyper-parameters -------------------------------------------------------------------
    @property
    def step_size(self) -> float:
        """Step size per full step; a change takes effect at the next step boundary."""
        return self.hyper("dt")

    @step_size.setter
    def step_size(self, value: float) -> None:
        check_step_size_and_L(value, 1.0)
        for group in self.param_groups:
            group["dt"] = float(value)

    @property
    def L(self) -> float:
        """Decoherence length of the velocity (the refresh rate is 1/L)."""
        return 1.0 / self.hyper("refresh_rate")

    @L.setter
    def L(self, value: float) -> None:
        check_step_size_and_L(1.0, value)
        for group in self.param_groups:
            group["refresh_rate"] = 1.0 / float(value)

    @property
    def phase(self) -> str:
        """'start' when the next call's gradient is at a step boundary, else 'mid' (or closing)."""
        return self._rule.phase

    @property
    def last_energy_change_per_dim(self) -> float | None:
        e = self.last_energy_change
        return None if e is None else e / self.num_params

    # -- control ------------------------------------------------------------------------------
    def first_step(self) -> None:
        """Abandon the step in progress; the next call starts a new one. ln_luminosity restarts."""
        self._rule.rearm()
        self._ln_lum = 0.0

    def final_step(self) -> None:
        """Close the trajectory with a kick and half refresh (no drift) at the next boundary."""
        self._rule.final_step()

    # -- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, loss=None, end_loss=None):
        """One gradient: half of a full step. `loss` (or the closure's return value) is the
        minibatch loss at the current position, for the energy; optional.

        With minibatch gradients the two ends of a full step must be scored on the *same*
        minibatch, or the energy change is swamped by S x the loss difference between batches
        (~1e6 at S ~ 1e7): at a boundary, `end_loss` is the loss at the current position on the
        finished step's minibatch (a closure may return `(loss, end_loss)`)."""
        loss, end_loss = step_losses(closure, loss, end_loss)
        eps, L = self.step_size, self.L
        self._collect_gradient()
        key = self._noise_key(self._rule.schedule(eps))
        sums = self._reduce(key)
        self._step += 1
        self.last_energy_change = self.last_kinetic_change = self.last_step_size = None
        loss_value = None if loss is None else float(loss)
        if not np.isfinite(sums).all() or (loss_value is not None and not math.isfinite(loss_value)):
            self._diverge(sums)
            return loss
        coef, closing = self._rule.coefficients(sums, eps=eps, L=L, scale=self.scale_likelihood,
                                                dim=self.ray_dims)
        potential = potential_end = math.nan
        if loss_value is not None and self._rule.at_boundary:
            prior = self.prior.neg_log_density(self.shards) if self.prior is not None else 0.0
            potential = self.scale_likelihood * loss_value + prior  # prior: a pass over x, at boundaries only
            potential_end = potential if end_loss is None else self.scale_likelihood * float(end_loss) + prior
        self._update(coef, key)
        self._book_call(sums, coef, closing, potential, eps, potential_end)
        return loss

    def _book_call(self, sums: Array, coef: rules.Coefficients, closing: Array, potential: float, eps: float,
                   potential_end: float) -> None:
        """After the update: the energy ledger, the finished step's record and the diagnostics."""
        kinetic = float(coef.d_ln_lum.sum())
        energy, kinetic_done, eps_done = self._rule.advance(kinetic, float(closing.sum()), potential, eps,
                                                            potential_end)
        if np.isfinite(eps_done):
            self.last_step_size = float(eps_done)
            self.last_kinetic_change = float(kinetic_done)
            self.last_energy_change = float(energy) if np.isfinite(energy) else None
        self._last_drift = float(coef.delta)
        self._ln_lum += kinetic
        self.diverged = False
        self.last_info = rules.step_diagnostics(sums, coef)

    @torch.no_grad()
    def _diverge(self, sums: Array) -> None:
        """Non-finite gradient or loss at the current position: undo the drift that led here."""
        self.diverged = True
        self.divergences += 1
        if self._last_drift and np.isfinite(sums[:, rules.VV]).all():
            for shard in self.shards:  # the stored u is the one the drift used
                shard.x.add_(shard.v, alpha=-self._last_drift)
                if shard.compute is not None:
                    shard.compute.copy_(shard.x)
        self._last_drift = 0.0
        self._rule.rearm()
        warnings.warn(f"MCLMC: non-finite gradient or loss at step {self._step - 1}: the last drift "
                      f"was reverted ({self.divergences} divergences so far); lower step_size or "
                      f"check the loss", RuntimeWarning, stacklevel=3)

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["mclmc"] = {"rule": self._rule.state_dict(), "last_drift": self._last_drift,
                          "divergences": self.divergences}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state.get("sampler") == type(self).__name__ and "mclmc" not in state:
            raise ValueError("state has no 'mclmc' section: save it with MCLMC.state_dict()")
        super().load_state_dict(state)  # checks the sampler type and layout first
        self._rule.load_state_dict(state["mclmc"]["rule"])
        self._last_drift = state["mclmc"]["last_drift"]
        self.divergences = state["mclmc"]["divergences"]
