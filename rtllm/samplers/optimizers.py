"""Samplers as torch optimizers over flat buffers: ray tracing, HMC and SGLD.

Each `step()` consumes the gradient of the minibatch loss at the current position, where the
target density is ln p(x) = -S * loss(x) (S = `scale_likelihood`; add a prior's negative log
density to the loss). A step is one reduce pass, a few float64 scalars (`rtllm.samplers.rules`) and one
update pass: the samplers differ only in their kick rule and schedule.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from rtllm.samplers import rules
from rtllm.state.backends import make_backend
from rtllm.state.flat import (MAX_SHARD_ELEMENTS, build_group, collect_grads, finish_materialize,
                              check_position_state, position_state_numel, zero_grads)
from rtllm.kernels.philox import STREAM_INIT, STREAM_REFRESH
from rtllm.state.layouts import DEFAULT_LAYOUT, get_layout
from rtllm.state.sharded import ShardedState
from rtllm.samplers.prior import GaussianPrior

_NEXT_PHASE = {"first": "steady", "steady": "steady", "closing": "first"}
_HYPER = ("dt", "refresh_rate", "mom_norm")


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


class FlatSampler(torch.optim.Optimizer):
    """Shared machinery; subclasses set `kick` and `schedule`."""

    kick: rules.KickRule = staticmethod(rules.ray_kick)
    min_ray_dim = 1
    layouts = ("fp32", "fp32-split")  # state layouts this sampler's passes support (rtllm.state.layouts)

    def __init__(self, params, *, dt: float, scale_likelihood: float | None = None,
                 loss_tolerance: float | None = None, refresh_rate: float = 1.0,
                 mom_norm: float = 1.0, seed: int = 0, ray: str = "group", backend: str = "auto",
                 prior_scale: float | None = None, prior_center: str = "zero",
                 max_shard_elements: int = MAX_SHARD_ELEMENTS,
                 device: torch.device | str | None = None,
                 init_weights: Callable[[], None] | None = None,
                 layout: str = DEFAULT_LAYOUT, sharded: ShardedState | None = None) -> None:
        _check_positive("dt", dt)
        get_layout(layout)  # an unknown name: a one-line error listing the registered ones
        if layout not in self.layouts:
            raise ValueError(f"{type(self).__name__} supports layout "
                             f"{' or '.join(map(repr, self.layouts))}, got {layout!r}")
        self.layout = layout
        _check_positive("refresh_rate", refresh_rate, allow_zero=True)
        _check_positive("mom_norm", mom_norm)
        if scale_likelihood is not None and loss_tolerance is not None:
            raise ValueError("give scale_likelihood or loss_tolerance, not both "
                             "(loss_tolerance sets scale_likelihood = D / (2 * loss_tolerance))")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        if ray not in ("group", "model"):
            raise ValueError(f"ray must be 'group' (one ray per parameter group) or 'model', got {ray!r}")
        self._built = False
        super().__init__(params, dict(dt=float(dt), refresh_rate=float(refresh_rate),
                                      mom_norm=float(mom_norm)))
        self._check_params()
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
        self.device = devices.pop()
        meta = self.device.type == "meta"
        if meta != (init_weights is not None):
            raise ValueError("init_weights= is required for, and only for, parameters on the meta "
                             "device: a callable that fills them in place once they are buffer "
                             "views (e.g. rtllm.lm.model_io.config_initializer(model))")
        sizes = [sum(p.numel() for p in g["params"]) for g in self.param_groups]
        bases = [sum(sizes[:i]) for i in range(len(sizes))]
        # sharded: local shards of FSDP2 parameters, exact sums (rtllm.state.sharded); sizes are global
        self.sharded = sharded
        if sharded is not None and meta:
            raise ValueError("sharded= takes materialized parameters (fully_shard builds them); "
                             "init_weights= is for meta parameters of one process")
        self._flat = sharded.build_groups(self.param_groups, layout=layout) if sharded is not None \
            else [build_group(g["params"], max_shard_elements, base_offset=b, total_numel=sum(sizes),
                              device=device, layout=layout)
                  for g, b in zip(self.param_groups, bases)]
        if meta:  # materialized straight into the buffers: no full-size copy of the model
            with torch.no_grad():
                init_weights()
            for fg in self._flat:
                finish_materialize(fg)
            self.device = self._flat[0].shards[0].x.device
        self._built = True

        self.num_params = sum(sizes)
        ray_sizes = sizes if ray == "group" else [self.num_params]
        self._ray_of_group = list(range(len(sizes))) if ray == "group" else [0] * len(sizes)
        for i, d in enumerate(ray_sizes):
            if d < self.min_ray_dim:
                raise ValueError(f"ray {i} has D = {d} parameters; ray tracing needs D >= 2 "
                                 f"(group the parameters into one ray with ray='model', or use HMC)")
        self.ray_dims = np.array(ray_sizes, dtype=np.float64)
        if scale_likelihood is not None:
            self.scale_likelihood = _check_positive("scale_likelihood", scale_likelihood)
        elif loss_tolerance is not None:
            self.scale_likelihood = self.num_params / (2 * _check_positive("loss_tolerance", loss_tolerance))
        else:
            self.scale_likelihood = float(self.num_params)
        self.seed = seed
        self.backend = make_backend(backend, self.device)
        self.prior = None if prior_scale is None else \
            GaussianPrior(self.shards, scale=prior_scale, center=prior_center)
        self._step = 0
        self._phase = "first"
        self._ln_lum = 0.0
        self.skipped_steps = 0
        self.last_info: dict[str, float] = {}  # diagnostics of the last step (rules.step_diagnostics)
        for fg in self._flat:
            for shard in fg.shards:
                self.backend.draw_velocity(shard, seed=seed, stream=STREAM_INIT, scale=mom_norm)
        self._momentum = [fg.view("v", i) for fg in self._flat for i in range(len(fg.params))]

    def _check_params(self) -> None:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                where = f"parameter {pi} of group {gi}"
                if not p.is_floating_point():
                    raise TypeError(f"{where} has dtype {p.dtype}; only floating-point parameters "
                                    f"can be sampled")
                if not p.requires_grad:
                    raise ValueError(f"{where} does not require grad; pass only the parameters "
                                     f"to sample (frozen ones stay out of the sampler)")
                if p.grad is not None and p.grad.is_sparse:
                    raise TypeError(f"{where} has a sparse gradient; sparse gradients are not "
                                    f"supported")

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_built", False):
            raise RuntimeError("parameter groups are fixed at construction (they live in flat "
                               "buffers); build a new sampler to change them")
        for key in _HYPER:
            if key in param_group:
                _check_positive(key, param_group[key], allow_zero=key == "refresh_rate")
        super().add_param_group(param_group)

    # -- public state -----------------------------------------------------------------------
    @property
    def ln_luminosity(self) -> float:
        """Accumulated change of log radiance (float64), summed over rays, since first_step()."""
        return self._ln_lum

    @property
    def shards(self) -> list:
        """All shards of all groups, in order."""
        return [s for fg in self._flat for s in fg.shards]

    @property
    def steps_taken(self) -> int:
        return self._step

    @property
    def momentum(self) -> list[Tensor]:
        """Velocity per parameter: views of the velocity buffer, writable in place."""
        return self._momentum

    @momentum.setter
    def momentum(self, values: Iterable[Tensor]) -> None:
        values = list(values)
        if len(values) != len(self._momentum):
            raise ValueError(f"momentum needs {len(self._momentum)} tensors, got {len(values)}")
        for i, (dst, src) in enumerate(zip(self._momentum, values)):
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"momentum[{i}] has shape {tuple(src.shape)}, the parameter has "
                                 f"{tuple(dst.shape)}")
        with torch.no_grad():
            for dst, src in zip(self._momentum, values):
                dst.copy_(src)

    def hyper(self, key: str) -> float:
        values = {g[key] for g in self.param_groups}
        if len(values) != 1:
            raise ValueError(f"{key} must be the same in every parameter group (the rays share one "
                             f"clock), got {sorted(values)}")
        return _check_positive(key, values.pop(), allow_zero=key == "refresh_rate")

    # -- control --------------------------------------------------------------------------
    def first_step(self) -> None:
        """Start a new trajectory: the next step is a first step, ln_luminosity restarts at 0."""
        self._phase = "first"
        self._ln_lum = 0.0

    def final_step(self) -> None:
        """Make the next step a closing step (no drift); the step after it is a first step."""
        self._phase = "closing"

    @torch.no_grad()
    def reverse_momentum(self) -> None:
        for fg in self._flat:
            for shard in fg.shards:
                shard.v.neg_()

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradient buffer in place (`set_to_none` is ignored: the .grad views must stay)."""
        for fg in self._flat:
            zero_grads(fg)

    # -- the step -------------------------------------------------------------------------
    def schedule(self, phase: str, dt: float, refresh_rate: float) -> rules.Schedule:
        return rules.step_schedule(phase, dt, refresh_rate)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        dt, refresh_rate, mom_norm = (self.hyper(k) for k in _HYPER)
        self._collect_gradient()
        schedule = self.schedule(self._phase, dt, refresh_rate)
        key = self._noise_key(schedule)
        ray_sums = self._reduce(key)
        self._step += 1
        if not np.isfinite(ray_sums).all():
            self.skipped_steps += 1
            warnings.warn(f"non-finite gradient (or velocity) at step {self._step - 1}: step "
                          f"skipped ({self.skipped_steps} so far); lower dt or check the loss",
                          RuntimeWarning, stacklevel=2)
            return loss
        coef = rules.compose(schedule, ray_sums, kick=self.kick, scale=self.scale_likelihood,
                             dim=self.ray_dims, refresh_rate=refresh_rate, mom_norm=mom_norm)
        self._update(coef, key)
        self._ln_lum += float(coef.d_ln_lum.sum())
        self._phase = _NEXT_PHASE[self._phase]
        self.last_info = rules.step_diagnostics(ray_sums, coef)
        return loss

    # The pieces of a step, shared with samplers whose step() differs (rtllm.samplers.mclmc).
    def _collect_gradient(self) -> None:
        """Gather every parameter's gradient into the flat buffer, plus the prior's term."""
        if self.sharded is not None:
            self.sharded.pull_grads()
        for fg in self._flat:
            collect_grads(fg)
        if self.prior is not None:
            self.prior.add_gradient_(self.shards, self.scale_likelihood)

    def _noise_key(self, schedule: rules.Schedule) -> dict:
        return dict(seed=self.seed, step=self._step, stream=STREAM_REFRESH,
                    noise=rules.needs_noise(schedule))

    def _reduce(self, key: dict) -> np.ndarray:
        """The reduce pass over every shard: float64 sums [rays, 6]."""
        if self.sharded is not None:  # exact sums, all-reduced over the ranks
            return self.sharded.ray_sums(self._flat, self._ray_of_group, len(self.ray_dims),
                                         self.backend, key)
        shards, shard_rays = self._shards_and_rays()
        # All shards in one call: the Triton backend launches once per kind of shard, not per ray.
        # The one host sync of the step: the scalar rule needs the sums.
        sums = self.backend.reduce_shards(shards, **key).to("cpu", torch.float64).numpy()
        ray_sums = np.zeros((len(self.ray_dims), 6))
        np.add.at(ray_sums, shard_rays, sums)
        return ray_sums

    def _update(self, coef: rules.Coefficients, key: dict) -> None:
        """The update pass over every shard with the composed coefficients."""
        # Coefficients below 1e-30 (e.g. alpha after a kick that fully turned v) add nothing at
        # fp32 resolution, and as fp32 subnormals they slow elementwise CPU kernels ~10x.
        alpha, beta, gamma = (np.where(np.abs(c) < 1e-30, 0.0, c).tolist()
                              for c in (coef.alpha, coef.beta, coef.gamma))
        shards, rays = self._shards_and_rays()
        self.backend.update_shards(shards, [alpha[r] for r in rays], [beta[r] for r in rays],
                                   [gamma[r] for r in rays], float(coef.delta), **key)

    def _shards_and_rays(self) -> tuple[list, list[int]]:
        """Every shard, and the ray each belongs to."""
        pairs = [(shard, ray) for fg, ray in zip(self._flat, self._ray_of_group) for shard in fg.shards]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue the chain exactly; its tensors are live references (a
        fp32-split position as its two planes, {"hi", "lo"}). Any layout loads any layout's state."""
        return {
            "sampler": type(self).__name__,
            "layout": self.layout,
            "seed": self.seed,
            "step": self._step,
            "phase": self._phase,
            "ln_luminosity": self._ln_lum,
            "skipped_steps": self.skipped_steps,
            "scale_likelihood": self.scale_likelihood,
            "ray_dims": self.ray_dims.tolist(),
            "hyper": [{k: g[k] for k in _HYPER} for g in self.param_groups],
            "position": [[s.position_state() for s in fg.shards] for fg in self._flat],
            "velocity": [[s.v for s in fg.shards] for fg in self._flat],
            "prior": None if self.prior is None else self.prior.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state.get("sampler") != type(self).__name__:
            raise ValueError(f"state is from a {state.get('sampler')!r} sampler, this is "
                             f"{type(self).__name__}")
        layout = [[s.numel for s in fg.shards] for fg in self._flat]
        theirs = [[position_state_numel(t) for t in g] for g in state["position"]]
        if theirs != layout or state["ray_dims"] != self.ray_dims.tolist():
            raise ValueError(f"state has shard sizes {theirs} and rays {state['ray_dims']}, this "
                             f"sampler has {layout} and {self.ray_dims.tolist()}: build it with the "
                             f"same parameters, groups and ray option")
        if len(state["hyper"]) != len(self.param_groups):
            raise ValueError(f"state has {len(state['hyper'])} parameter groups, this sampler "
                             f"{len(self.param_groups)}")
        if (state.get("prior") is None) != (self.prior is None):
            raise ValueError("state and sampler disagree on having a prior; build the sampler "
                             "with the same prior_scale / prior_center")
        for fg, xs in zip(self._flat, state["position"]):
            for shard, x in zip(fg.shards, xs):
                check_position_state(x, shard.numel)
        # Everything checked: from here on the state is written.
        for fg, xs, vs in zip(self._flat, state["position"], state["velocity"]):
            for shard, x, v in zip(fg.shards, xs, vs):
                shard.set_position(x)
                shard.v.copy_(v)
        for group, hyper in zip(self.param_groups, state["hyper"]):
            group.update(hyper)
        self.seed = state["seed"]
        self._step = state["step"]
        self._phase = state["phase"]
        self._ln_lum = state["ln_luminosity"]
        self.skipped_steps = state["skipped_steps"]
        self.scale_likelihood = state["scale_likelihood"]
        if self.prior is not None:
            self.prior.load_state_dict(state["prior"])


class RayTracer(FlatSampler):
    """The ray tracing sampler (Behroozi 2025) as a drop-in torch optimizer.

    Rays move at constant speed through weight space; gradients only turn them, which makes the
    sampler robust to minibatch noise. Args: dt (time step; the physical step is dt*|v|, about
    dt*sqrt(D)); scale_likelihood S (default D, the total number of sampled parameters) or
    loss_tolerance (S = D / (2*loss_tolerance)); refresh_rate (partial momentum refresh per unit
    time; 0 disables it); mom_norm (std of the velocity components); seed; ray ('group': each
    parameter group is its own ray, 'model': one ray); backend ('auto', 'torch', 'triton',
    'reference'); prior_scale / prior_center: an optional N(center, prior_scale^2 I) prior, not
    scaled by S (rtllm.samplers.prior), whose gradient step() adds to the gradient buffer (so zero the
    gradients between steps, as with any optimizer). A parameter whose .grad is None at step() has zero gradient.
    Parameters on the meta device are materialized into the buffers on `device`, then filled by
    `init_weights()` (e.g. `rtllm.lm.model_io.config_initializer(model)`): no full-size copy of the
    model is ever made (see rtllm.state.flat). layout: 'fp32' (default) or, for bf16 parameters,
    'fp32-split': the same fp32 position stored as two 16-bit planes whose high one is the
    model's weights, 10 instead of 12 bytes/parameter, the same chain (docs/precision.md).
    """

    min_ray_dim = 2


class HMC(FlatSampler):
    """Hamiltonian Monte Carlo with partial momentum refresh (unit mass), same interface.

    ln_luminosity accumulates the kinetic-energy change of the kicks, so a Metropolis test reads
    exactly as for RayTracer: accept with min(1, exp(ln p(x1) - ln p(x0) - ln_luminosity)).
    """

    kick = staticmethod(rules.hmc_kick)

    def __init__(self, params, *, dt: float, mom_norm: float = 1.0, **kwargs) -> None:
        if mom_norm != 1.0:
            raise ValueError(f"mom_norm must be 1 for {type(self).__name__} (unit mass: another "
                             f"value would sample p**(1/mom_norm**2)), got {mom_norm!r}; scale dt "
                             f"instead")
        super().__init__(params, dt=dt, mom_norm=1.0, **kwargs)


class SGLD(HMC):
    """Stochastic gradient Langevin dynamics: x <- x + (dt^2/2) grad ln p + dt N(0, I).

    That is one HMC step with a full momentum refresh; the SGLD step size is eps = dt^2/2.
    """

    def schedule(self, phase: str, dt: float, refresh_rate: float) -> rules.Schedule:
        return [(rules.REFRESH, rules.FULL_REFRESH), (rules.KICK, dt / 2), (rules.DRIFT, dt)]
