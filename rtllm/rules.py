"""Scalar rules: float64 arithmetic that turns six sums into one fused update.

Every sampler step has the form (algorithms.md section 2)

    v_new = alpha*v + beta*g + gamma*n,      x_new = x + delta*v_new

with n the refresh noise. A step is a *schedule* of operations -- kick K(h), refresh O(h),
drift D(h) -- applied to a velocity that stays a linear combination p*v + q*g + r*n of the
three vectors the reduce pass summed over. Its norms follow from the Gram matrix of (v, g, n),
so any schedule costs one reduce pass and one update pass. The rules are numpy float64
arithmetic on arrays, so one implementation serves a single optimizer (shape [rays]) and many
independent chains at once (shape [chains]); numpy rather than torch because a torch op on a
0-d tensor costs ~4 us and a step runs ~100 of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

KICK, REFRESH, DRIFT = "K", "O", "D"
FULL_REFRESH = math.inf  # an O(h) whose rate makes f = 0: v is redrawn from scratch

# Index of each sum in the [..., 6] tensor the reduce pass returns.
VV, GG, VG, NN, NV, NG = range(6)

Schedule = Sequence[tuple[str, float]]


@dataclass(frozen=True)
class Coefficients:
    """The fused update's scalars, one entry per ray, and the log-radiance change."""

    alpha: Array
    beta: Array
    gamma: Array
    delta: float
    d_ln_lum: Array  # per ray; the sampler adds them up


# ---------------------------------------------------------------------------- kicks
KickRule = Callable[[Array, Array, Array, float, float, Array], tuple[Array, Array, Array]]


def ray_kick(vv: Array, gg: Array, vg: Array, h: float, scale: float, dim: Array):
    """Exact ray-equation kick: rotate v towards -g over path time h, keeping |v|.

    Returns (a, b, d_ln_lum) with v' = a*v + b*g. theta is the angle between v and the
    likelihood gradient -g; tan(theta'/2) = tan(theta/2) * exp(-k).
    """
    with np.errstate(all="ignore"):  # both branches of each np.where are evaluated
        mn, gn = np.sqrt(vv), np.sqrt(gg)
        live = (gg > 0) & (vv > 0)  # zero gradient (or velocity): no kick, the ray still drifts
        c = np.clip(np.where(live, -vg / (mn * gn), 0.0), -1.0, 1.0)
        k = h * mn * gn * scale / (dim - 1)
        sin_t = np.sqrt((1 - c) * (1 + c))
        # Below ~1e-7 sin(theta) is under the resolution of c (known to a few eps from the sums):
        # v is parallel to g as far as we can tell, and there is nothing to rotate.
        turns = live & (sin_t > 1e-7)
        # log(sin(theta)/sin(theta')) = k + log1p((1-c)/2 * expm1(-2k)): accurate for k ~ 1e-10
        # (large D); for large k the log1p argument nears -1, so switch to a logaddexp form.
        x = 0.5 * (1 - c) * np.expm1(-2 * k)
        ln_ratio = np.where(x > -0.5, k + np.log1p(x),
                            np.logaddexp(np.log(0.5 * (1 + c)) + k, np.log(0.5 * (1 - c)) - k))
        d_ln_lum = np.where(turns, (dim - 1) * ln_ratio, np.where(live, (dim - 1) * k * c, 0.0))
        tau = np.sqrt((1 - c) / (1 + c)) * np.exp(-k)
        cos_new = (1 - tau * tau) / (1 + tau * tau)
        sin_new = 2 * tau / (1 + tau * tau)
        a = np.where(turns, sin_new / sin_t, 1.0)
        b = np.where(turns, -(cos_new - a * c) * mn / gn, 0.0)
    return a, b, d_ln_lum


def hmc_kick(vv: Array, gg: Array, vg: Array, h: float, scale: float, dim: Array):
    """Hamiltonian kick v' = v - h*S*g; d_ln_lum is the kinetic-energy change."""
    b = np.full_like(vv, -h * scale)
    d_kinetic = 0.5 * (b * b * gg + 2 * b * vg)
    return np.ones_like(vv), b, d_kinetic


# ---------------------------------------------------------------------------- refresh
def refresh_coefficients(h: float, rate: float, mom_norm: float) -> tuple[float, float]:
    """Exact Ornstein-Uhlenbeck step v <- f*v + s*n that keeps N(0, mom_norm^2) invariant."""
    x = abs(rate * h)
    # sqrt(1 - f^2) via expm1: accurate when rate*h is tiny.
    return math.exp(-x), math.sqrt(-math.expm1(-2 * x)) * mom_norm


# ---------------------------------------------------------------------------- schedules
def step_schedule(phase: str, dt: float, refresh_rate: float) -> list[tuple[str, float]]:
    """The ray tracing / HMC step of algorithms.md section 1 for phase first|steady|closing."""
    if refresh_rate == 0:
        return {
            "first": [(KICK, dt / 2), (DRIFT, dt)],
            "steady": [(KICK, dt), (DRIFT, dt)],  # two frozen-gradient half kicks compose exactly
            "closing": [(KICK, dt / 2)],
        }[phase]
    return {
        "first": [(REFRESH, dt / 2), (KICK, dt / 2), (DRIFT, dt)],
        "steady": [(KICK, dt / 2), (REFRESH, dt), (KICK, dt / 2), (DRIFT, dt)],
        "closing": [(KICK, dt / 2), (REFRESH, dt / 2)],
    }[phase]


def needs_noise(schedule: Schedule) -> bool:
    return any(op == REFRESH for op, _ in schedule)


def compose(
    schedule: Schedule,
    sums: Array,
    *,
    kick: KickRule,
    scale: float,
    dim: Array,
    refresh_rate: float,
    mom_norm: float,
) -> Coefficients:
    """Fold a schedule into the fused update's coefficients.

    sums: float64 [..., 6] (vv, gg, vg, nn, nv, ng) per ray; dim: rays' dimensions, same shape
    as sums[..., 0]. The velocity is tracked as p*v + q*g + r*n; a refresh may appear at most
    once (one noise vector per step) and a drift only last.
    """
    s = np.asarray(sums, dtype=np.float64)
    vv, gg, vg, nn, nv, ng = np.moveaxis(s, -1, 0)
    dim = np.asarray(dim, dtype=np.float64)
    one, zero = np.ones_like(vv), np.zeros_like(vv)
    p, q, r = one, zero, zero
    d_ln_lum = zero
    delta = 0.0
    refreshed = False
    for i, (op, h) in enumerate(schedule):
        if op == KICK:
            cur_vv = p * p * vv + q * q * gg + r * r * nn + 2 * (p * q * vg + p * r * nv + q * r * ng)
            cur_vg = p * vg + q * gg + r * ng
            a, b, dl = kick(np.maximum(cur_vv, 0.0), gg, cur_vg, h, scale, dim)
            p, q, r = a * p, a * q + b, a * r
            d_ln_lum = d_ln_lum + dl
        elif op == REFRESH:
            if refreshed:
                raise ValueError("a schedule may refresh once per step (one noise vector)")
            refreshed = True
            if h == FULL_REFRESH:
                f, sn = 0.0, mom_norm
            else:
                f, sn = refresh_coefficients(h, refresh_rate, mom_norm)
            p, q, r = f * p, f * q, f * r + sn
        elif op == DRIFT:
            if i != len(schedule) - 1:
                raise ValueError("the drift must be the last operation of a step")
            delta = h
        else:
            raise ValueError(f"unknown schedule operation {op!r}")
    return Coefficients(alpha=p, beta=q, gamma=r, delta=delta, d_ln_lum=d_ln_lum)


def step_diagnostics(sums: Array, coef: Coefficients) -> dict[str, float]:
    """Diagnostics of one step from its sums: |g|, the speed after it, the largest angle turned.

    The angle between v and v_new (radians, over rays) shows how hard the gradients steer.
    """
    s = np.asarray(sums, dtype=np.float64)
    vv, gg, vg, nn, nv, ng = np.moveaxis(s, -1, 0)
    a, b, c = coef.alpha, coef.beta, coef.gamma
    new_vv = np.maximum(a * a * vv + b * b * gg + c * c * nn + 2 * (a * b * vg + a * c * nv + b * c * ng), 0.0)
    with np.errstate(all="ignore"):
        cos = (a * vv + b * vg + c * nv) / np.sqrt(vv * new_vv)
    angle = np.arccos(np.clip(np.nan_to_num(cos, nan=1.0), -1.0, 1.0))
    return {
        "grad_norm": float(np.sqrt(gg.sum())),
        "speed": float(np.sqrt(new_vv.sum())),
        "angle": float(angle.max()),
    }
