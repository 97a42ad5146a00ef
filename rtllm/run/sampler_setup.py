"""Which sampler a sampling run steps with, and MCLMC's tuning inside the burn-in.

`rtllm.run.sampling` stays sampler-agnostic: it asks `build_sampler` for an optimizer, and when
the config says `sampler="mclmc"` with an automatic step size or L it runs `tune_in_burn_in`
(MILE's phases I-III) on the first gradients of the burn-in instead of the ray tracer's dt
trials.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rtllm.run.config import SampleConfig
from rtllm.samplers.mclmc import MCLMC
from rtllm.samplers.smile import SMILE
from rtllm.lm.model_io import param_groups_for
from rtllm.samplers.optimizers import RayTracer

# Where MCLMC's step-size tuning starts, as a path length in weight space: the ray tracer's
# dt0 = 0.03/sqrt(D) at speed |v| ~ sqrt(D) moves the same 0.03 per step.
MCLMC_START_STEP = 0.03


def build_sampler(cfg: SampleConfig, sampled: list, scale: float, seed: int, *, sharded=None):
    """sharded: a rtllm.state.sharded.ShardedState for --shard-state (FSDP2 parameters)."""
    groups = param_groups_for(sampled, cfg.ray_per)
    common = dict(scale_likelihood=scale, seed=seed, ray="model" if cfg.ray_per == "model" else "group",
                  prior_scale=cfg.prior_scale, prior_center=cfg.prior_center, layout=cfg.layout,
                  **({} if sharded is None else {"sharded": sharded}))
    if cfg.sampler == "smile":  # no tuning: its controller adapts the step size as it samples
        return SMILE(groups, step_size=MCLMC_START_STEP if cfg.dt == "auto" else float(cfg.dt),
                     precondition=cfg.precondition,
                     precondition_clip=cfg.precondition_clip, **common)
    if cfg.sampler == "mclmc":
        dim = sum(p.numel() for _, p in sampled)
        return MCLMC(groups, step_size=MCLMC_START_STEP if cfg.dt == "auto" else float(cfg.dt),
                     L=max(math.sqrt(dim), 15.0) if cfg.L == "auto" else float(cfg.L), **common)
    return RayTracer(groups, dt=1.0 if cfg.dt == "auto" else cfg.dt, refresh_rate=cfg.refresh_rate, **common)


def needs_tuning(cfg: SampleConfig) -> bool:
    return cfg.sampler == "mclmc" and (cfg.dt == "auto" or cfg.L == "auto")


def tune_in_burn_in(cfg: SampleConfig, sampler: MCLMC, next_loss: Callable[[], torch.Tensor],
                    say: Callable[[str], None]) -> tuple[float, float, dict]:
    """MILE's phases on the first 2 * sum(phases) gradients; returns (step_size, L, record).

    next_loss: computes the next minibatch's loss with its gradient in the sampler's buffer
    (and advances the run's step and batch counters). A step size or L given in the config
    replaces the tuned one (the other is still tuned).
    """
    from rtllm.samplers.mclmc_tune import tune_mclmc

    p1, p2, p3 = cfg.mclmc_phases
    if cfg.L != "auto":  # L given: tune the step size for it; phases II and III would only tune L
        p2 = p3 = 0
    say(f"tuning MCLMC (MILE phases {p1}/{p2}/{p3} full steps, {2 * (p1 + p2 + p3)} gradients of "
        f"the burn-in) from step size {sampler.step_size:.3g}, L {sampler.L:.3g}")
    eps, L, info = tune_mclmc(sampler, next_loss, phase1=p1, phase2=p2, phase3=p3, seed=cfg.seed,
                              initial_L=None if cfg.L == "auto" else float(cfg.L),
                              target_var=cfg.mclmc_target)
    if cfg.dt != "auto":
        eps = float(cfg.dt)
    if cfg.L != "auto":
        L = float(cfg.L)
    sampler.step_size, sampler.L = eps, L
    energy = np.asarray(info.energy_change[-max(1, p2):], dtype=np.float64)
    finite = energy[np.isfinite(energy)]
    record = {"type": "mclmc_tune", "step_size": eps, "L": L, "phases": [p1, p2, p3],
              "L_phase2": float(info.L_phase2.reshape(-1)[0]), "L_phase3": float(info.L_phase3.reshape(-1)[0]),
              "divergences": int(info.divergences.sum()),
              "energy_var_per_dim_end": float((finite ** 2).mean() / sampler.num_params) if finite.size else None,
              "target_var_end": float(info.target_var[-1]) if info.target_var.size else None}
    say(f"MCLMC tuned: step size {eps:.4g}, L {L:.4g} ({record['divergences']} divergences)")
    return eps, L, record


def load_init_weights(model: torch.nn.Module, init_dir: str | Path) -> None:
    """Start from the weights in `init_dir` (e.g. a MILE member): same architecture, strict names."""
    from safetensors.torch import load_file

    path = Path(init_dir) / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"--init {init_dir}: no model.safetensors there; pass a directory written by "
                         f"save_pretrained for the same architecture as --model")
    weights = load_file(str(path))
    own = model.state_dict()
    missing = [k for k in own if k not in weights and not _is_tied_alias(model, k, weights)]
    wrong = [k for k, t in weights.items() if k in own and tuple(t.shape) != tuple(own[k].shape)]
    if missing or wrong:
        raise ValueError(f"--init {init_dir} does not match --model: missing {missing[:3]}, shape "
                         f"mismatch {wrong[:3]}; it must be the same architecture")
    with torch.no_grad():
        for name, tensor in weights.items():
            if name in own:
                own[name].copy_(tensor)


def _is_tied_alias(model: torch.nn.Module, name: str, weights: dict) -> bool:
    """save_pretrained drops tied copies (GPT-2's lm_head.weight): present under its other name."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        return False
    return any(other in weights and params[other] is params[name] for other in params if other != name)
