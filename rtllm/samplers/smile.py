"""SMILE: microcanonical Langevin dynamics on minibatch gradients (Sommer et al. 2026), optimizer form.

MCLMC's machinery (`rtllm.samplers.mclmc`): a unit velocity per ray, the exact ESH kick, the
McLachlan scheme with kicks [b1, 1 - 2 b1, b1] eps around two half drifts, one full step over two
`step()` calls whose gradients should come from the *same* minibatch. What SMILE changes:

- **no partial velocity refresh**: the minibatch noise is the stochasticity;
- **a step-size controller** on the energy error of each full step (`smile_controller`): a Gamma
  fit by running moments, Wilson-Hilferty quantiles, eps shrunk or grown by 2%;
- **rejection**: a step whose |dE| exceeds the fit's quantile r is undone -- x restored *exactly*
  from a copy taken at the step's start (4 bytes/parameter more than MCLMC) and the velocity zeroed.
  With u = 0 the ESH kick's limit points the velocity along the force, which is how the next
  step starts (the authors' update gives the same limit).

The energy of a full step needs U at both of its ends on the step's minibatch: pass `loss` (the
minibatch loss at the current position) at every step-boundary call, and, with minibatches,
`end_loss` (the current position scored on the finished step's minibatch), as for MCLMC. Scale the
likelihood to the data set: S = number of tokens (or examples) the mean loss is over.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from rtllm.samplers import rules
from rtllm.samplers.mclmc import MCLMC, MCLMCRule, step_losses
from rtllm.samplers.smile_controller import ControllerConfig, StepSizeController
from rtllm.samplers.smile_precond import DiagonalPreconditioner

_UNUSED_L = 1.0  # MCLMC's machinery takes a refresh rate; SMILE's schedule never refreshes


class SmileRule(MCLMCRule):
    """MCLMC's phase machine and energy ledger, with the refresh taken out of every schedule."""

    def schedule(self, eps) -> rules.Schedule:
        return [op for op in super().schedule(eps) if op[0] != rules.UNIT_REFRESH]


def _velocity_along_force(sums: rules.Array) -> rules.Array:
    """The sums as if the (zeroed) velocity were the unit vector along the force -g/|g|."""
    out = np.array(sums, dtype=np.float64, copy=True)
    out[:, rules.VV] = 1.0
    out[:, rules.VG] = -np.sqrt(out[:, rules.GG])
    out[:, rules.NV] = 0.0
    return out


class SMILE(MCLMC):
    """SMILE (minibatch MCLMC) as a torch optimizer over flat buffers.

    Args: step_size (initial eps per full step; the controller adapts it), scale_likelihood S (the
    data set size for a mean loss) or loss_tolerance, seed, ray, backend, prior_scale /
    prior_center (as MCLMC), and the controller's settings (`ControllerConfig`: reject_quantile r,
    band a, rate delta_s, ema beta, freeze_steps, min_step, max_step). No L: there is no refresh.
    precondition=True: pSMILE, a diagonal preconditioner from an EMA of the gradient's mean and
    variance (`rtllm.samplers.smile_precond`; 12 more bytes per parameter); precondition_clip
    "relative" (default: s clipped to [0.1, 100] x rms(s), scale-free) or "absolute" (the
    authors' [1e-2, 1e4], which diverges on LMs with a large likelihood scale: docs/smile.md).

    After each call that finishes a full step: `last_energy_change` and `last_step_size` (the eps
    it was taken with); `last_rejected` says whether it was undone. Counters: `rejections`,
    `divergences` (a non-finite gradient or loss: handled as a rejection).
    """

    def __init__(self, params, *, step_size: float, controller: ControllerConfig | None = None,
                 precondition: bool = False, precondition_clip: str = "relative", **kwargs) -> None:
        if "L" in kwargs:
            raise TypeError("SMILE has no L: it never refreshes the velocity (the minibatch noise does)")
        if not isinstance(precondition, bool):
            raise TypeError(f"precondition must be True or False, got {precondition!r}")
        if precondition and kwargs.get("sharded") is not None:
            raise ValueError("SMILE(precondition=True) does not support sharded= yet (the "
                             "preconditioner's normalization is a sum over all ranks); run pSMILE "
                             "unsharded or drop --precondition")
        super().__init__(params, step_size=step_size, L=_UNUSED_L, **kwargs)
        self.preconditioner = (DiagonalPreconditioner(self.shards, clip=precondition_clip)
                               if precondition else None)
        if precondition and precondition_clip == "absolute" and self.scale_likelihood > 1e4:
            warnings.warn(f"pSMILE with the authors' absolute clip [1e-2, 1e4] at scale_likelihood "
                          f"{self.scale_likelihood:.3g}: the gradient scale s = S x (gradient noise) "
                          "mostly exceeds the ceiling (no adaptation) and coordinates without gradient "
                          "drift ~1e4x faster; on the tiny GPT-2 this diverged (+1.5 nats held-out NLL, "
                          "docs/smile.md). Use precondition_clip='relative' (the default)",
                          RuntimeWarning, stacklevel=2)
        self._rule = SmileRule()
        self.controller = StepSizeController(controller)
        self.rejections = 0
        self.last_rejected = False
        self._velocity_zeroed = False
        # x at the start of the full step in progress: a rejection restores it exactly.
        self._step_start = [shard.position(copy=True) for shard in self.shards]

    @property
    def L(self) -> float:
        """No decoherence length: the velocity is never refreshed."""
        return math.inf

    @L.setter
    def L(self, value: float) -> None:
        raise AttributeError("SMILE has no L: it never refreshes the velocity")

    # -- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, loss=None, end_loss=None):
        """One gradient, half a full step. `loss` is required at step boundaries (the controller
        reads the energy); `end_loss` as for MCLMC.step."""
        loss, end_loss = step_losses(closure, loss, end_loss)
        rule = self._rule
        if rule.at_boundary and loss is None:
            raise ValueError("SMILE needs the loss at every step boundary: step(loss=...) or a closure "
                             "that returns it (its step-size controller reads the energy error)")
        eps = self.step_size
        self._collect_gradient()
        if self.preconditioner is not None:
            if rule.at_boundary:
                # p of the step opening here, from the gradients of the boundaries before, so it
                # does not depend on this step's minibatch (as in the authors' code, whose
                # statistics take the previous step's end gradient); then this gradient enters
                # the statistics for the next step.
                self.preconditioner.refresh()
                self.preconditioner.observe(self.scale_likelihood)
            self.preconditioner.scale_gradients()  # the kicks see g * p (the step's p)
        key = self._noise_key(rule.schedule(eps))
        sums = self._reduce(key)
        self._step += 1
        self.last_energy_change = self.last_kinetic_change = self.last_step_size = None
        self.last_rejected = False
        loss_value = None if loss is None else float(loss)
        end_value = loss_value if end_loss is None else float(end_loss)
        if not np.isfinite(sums).all() or (loss_value is not None and not math.isfinite(end_value + loss_value)):
            self.divergences += 1
            self._reject(f"non-finite gradient or loss at step {self._step - 1}")
            return loss
        if self._velocity_zeroed:
            sums = _velocity_along_force(sums)
        potential = potential_end = math.nan
        if rule.at_boundary:
            prior = self.prior.neg_log_density(self.shards) if self.prior is not None else 0.0
            potential = self.scale_likelihood * loss_value + prior
            potential_end = self.scale_likelihood * end_value + prior
            if float(rule.eps_open) > 0:  # a full step ends here: the controller judges it
                _, closing = rule.coefficients(sums, eps=eps, L=_UNUSED_L, scale=self.scale_likelihood,
                                               dim=self.ray_dims)
                energy = float(rule.pending + closing.sum() + potential_end - rule.potential_start)
                decision = self.controller.observe(energy, float(rule.eps_open))
                self.step_size = eps = decision.step_size
                if decision.reject:
                    self.last_energy_change, self.last_step_size = energy, float(rule.eps_open)
                    self.last_rejected = True
                    self.rejections += 1
                    self._reject(None)
                    return loss
        coef, closing = rule.coefficients(sums, eps=eps, L=_UNUSED_L, scale=self.scale_likelihood,
                                          dim=self.ray_dims)
        if self._velocity_zeroed:  # v is 0 in memory: fold the virtual unit velocity into beta
            coef = rules.Coefficients(alpha=coef.alpha, beta=coef.beta - coef.alpha / np.sqrt(sums[:, rules.GG]),
                                      gamma=coef.gamma, delta=coef.delta, d_ln_lum=coef.d_ln_lum)
            self._velocity_zeroed = False
        if rule.phase == "start":  # a full step opens from here
            for saved, shard in zip(self._step_start, self.shards):
                saved.copy_(shard.position())
        self._update(coef, key)
        self._book_call(sums, coef, closing, potential, eps, potential_end)
        return loss

    @torch.no_grad()
    def _reject(self, warning: str | None) -> None:
        """Restore x exactly to the step's start, zero the velocity, start a new step there."""
        for saved, shard in zip(self._step_start, self.shards):
            shard.set_position(saved)
            shard.v.zero_()
        self._velocity_zeroed = True
        self._last_drift = 0.0
        self._rule.rearm()
        self.diverged = warning is not None
        if warning is not None:
            # Shrink the step as the controller would, so a divergence is not met again at once.
            cfg = self.controller.config
            self.step_size = max(self.step_size * (1 - cfg.rate), cfg.min_step)
            warnings.warn(f"SMILE: {warning}: the step was undone ({self.divergences} divergences so "
                          f"far); lower step_size or check the loss", RuntimeWarning, stacklevel=3)

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["smile"] = {"controller": self.controller.state_dict(), "rejections": self.rejections,
                          "velocity_zeroed": self._velocity_zeroed, "step_start": self._step_start,
                          "preconditioner": None if self.preconditioner is None
                          else self.preconditioner.state_dict()}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state.get("sampler") == type(self).__name__ and "smile" not in state:
            raise ValueError("state has no 'smile' section: save it with SMILE.state_dict()")
        if "smile" in state and (state["smile"].get("preconditioner") is None) != (self.preconditioner is None):
            raise ValueError("state and sampler disagree on precondition: build the sampler with "
                             "the precondition= setting the state was saved with")
        super().load_state_dict(state)
        smile = state["smile"]
        self.controller.load_state_dict(smile["controller"])
        self.rejections = smile["rejections"]
        self._velocity_zeroed = smile["velocity_zeroed"]
        for saved, value in zip(self._step_start, smile["step_start"]):
            saved.copy_(value)
        if self.preconditioner is not None:
            self.preconditioner.load_state_dict(smile["preconditioner"])
