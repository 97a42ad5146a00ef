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
# MCLMC's partial refresh of a unit velocity: u <- normalize(u + nu*n), nu from h and the rate 1/L.
UNIT_REFRESH = "U"

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
    return any(op in (REFRESH, UNIT_REFRESH) for op, _ in schedule)


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
    as sums[..., 0]. The velocity is tracked as p*v + q*g + r*n; a refresh (REFRESH or
    UNIT_REFRESH, whose rate is refresh_rate) may appear at most once (one noise vector per
    step) and a drift only last. Durations h may be arrays broadcasting against the rays
    (per-chain step sizes); delta is then an array too.
    """
    s = np.asarray(sums, dtype=np.float64)
    vv, gg, vg, nn, nv, ng = np.moveaxis(s, -1, 0)
    dim = np.asarray(dim, dtype=np.float64)
    one, zero = np.ones_like(vv), np.zeros_like(vv)
    p, q, r = one, zero, zero
    d_ln_lum = zero
    delta = 0.0
    refreshed = False

    def gram(p, q, r):  # |p v + q g + r n|^2 from the sums
        return p * p * vv + q * q * gg + r * r * nn + 2 * (p * q * vg + p * r * nv + q * r * ng)

    for i, (op, h) in enumerate(schedule):
        if op == KICK:
            cur_vv = gram(p, q, r)
            cur_vg = p * vg + q * gg + r * ng
            a, b, dl = kick(np.maximum(cur_vv, 0.0), gg, cur_vg, h, scale, dim)
            p, q, r = a * p, a * q + b, a * r
            d_ln_lum = d_ln_lum + dl
        elif op in (REFRESH, UNIT_REFRESH):
            if refreshed:
                raise ValueError("a schedule may refresh once per step (one noise vector)")
            refreshed = True
            if op == UNIT_REFRESH:  # u <- normalize(u + nu n), the norm from the Gram sums
                r = r + unit_refresh_nu(h, refresh_rate, dim)
                norm2 = gram(p, q, r)
                with np.errstate(all="ignore"):
                    inv = np.where(norm2 > 0, 1.0 / np.sqrt(norm2), 1.0)
                p, q, r = inv * p, inv * q, inv * r
                continue
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


# ---------------------------------------------------------------------------- MCLMC
# McLachlan's minimal-norm integrator: kicks of b1*eps, (1 - 2 b1)*eps, b1*eps around two
# half drifts (Omelyan, Mryglod and Folk 2002; the coefficient MCLMC / MILE use).
MCLMC_B1 = 0.1931833275037836
# Cap on nu^2 * D = expm1(2 h / L) in a unit refresh: beyond e^138 ~ 1e60 the old velocity
# weighs < 1e-30 of the new one (a full refresh), and the Gram sums stay far from overflow.
_MAX_REFRESH_EXPONENT = 138.0


def esh_kick(vv: Array, gg: Array, vg: Array, h: float, scale: float, dim: Array):
    """Exact ESH velocity update of a unit velocity over time h (MCLMC), in the direct form.

    With e = -g/|g| (the direction of grad ln p = -S g), ue = u.e, delta = h S |g| / (D-1) and
    z = exp(-delta): u' = normalize(e (1-z)(1+z+ue(1-z)) + 2 z u) = a*u + b*g, and the kinetic
    energy change is (D-1) (delta - ln 2 + ln(1 + ue + (1-ue) z^2)). u enters as u/|u|, so u'
    is a unit vector whatever |u| was (fp32 rounding of the stored velocity never accumulates).
    Returns (a, b, kinetic change). This is ray_kick at |v| = 1 (tan(theta'/2) =
    tan(theta/2) e^-delta), written in the MCLMC papers' form.
    """
    with np.errstate(all="ignore"):  # both branches of each np.where are evaluated
        mn, gn = np.sqrt(vv), np.sqrt(gg)
        live = (gg > 0) & (vv > 0)  # zero gradient: no kick (u is still normalized)
        ue = np.clip(np.where(live, -vg / (mn * gn), 0.0), -1.0, 1.0)
        delta = h * scale * gn / (dim - 1)
        z = np.exp(-delta)
        one_minus_z = -np.expm1(-delta)  # accurate for delta ~ 1e-10 (large D)
        # |e (1-z)(1+z+ue(1-z)) + 2 z u| = (1+ue) + (1-ue) z^2 exactly (expand the square):
        # a sum of two non-negative terms, so the normalization never cancels.
        norm = (1 + ue) + (1 - ue) * z * z
        # Below ~1e-7, sin(u, e) is under the resolution of ue (known to a few eps from the
        # sums): u is parallel to g as far as we can tell and there is nothing to rotate.
        turns = live & (np.sqrt((1 - ue) * (1 + ue)) > 1e-7)
        a = np.where(turns, 2 * z / (mn * norm), np.where(vv > 0, 1 / mn, 1.0))
        b = np.where(turns, -one_minus_z * (1 + z + ue * one_minus_z) / (gn * norm), 0.0)
        # delta - ln 2 + ln(norm) = delta + log1p((1-ue)/2 * expm1(-2 delta)): accurate for
        # delta ~ 1e-10; for large delta the log1p argument nears -1, so switch to logaddexp.
        x = 0.5 * (1 - ue) * np.expm1(-2 * delta)
        per_dim = np.where(x > -0.5, delta + np.log1p(x),
                           np.logaddexp(np.log(0.5 * (1 + ue)) + delta, np.log(0.5 * (1 - ue)) - delta))
        kinetic = np.where(live, (dim - 1) * per_dim, 0.0)
    return a, b, kinetic


def unit_refresh_nu(h, rate, dim):
    """nu of the unit refresh u <- normalize(u + nu*n) over time h at rate 1/L.

    nu^2 D = exp(2 h / L) - 1, so |u|/|u + nu n| ~ exp(-h/L): the velocity decorrelates over
    the length L (MCLMC's partial refresh); two refreshes of h1, h2 decorrelate as one of h1 + h2.
    """
    t = np.minimum(2 * np.abs(np.asarray(h, dtype=np.float64) * rate), _MAX_REFRESH_EXPONENT)
    return np.sqrt(np.expm1(t) / np.asarray(dim, dtype=np.float64))


def mclmc_schedule(phase: str, eps, eps_open) -> list[tuple[str, float]]:
    """The MCLMC operations of one gradient evaluation (one optimizer step() call).

    A full step of size eps (McLachlan, 2 gradients) spans two calls; the closing kick of a
    step and the opening kick of the next share the gradient at the boundary, so they sit in
    one call with the refresh between them:
      start:   K(b1 eps_open) U((eps_open + eps)/2) K(b1 eps) D(eps/2)   (gradient at a step start)
      mid:     K((1 - 2 b1) eps_open) D(eps_open/2)                       (gradient at mid-step)
      closing: K(b1 eps_open) U(eps_open/2)                               (end a trajectory)
    eps_open is the step size of the full step in progress (0: none, e.g. the very first call,
    whose start is then U(eps/2) K(b1 eps) D(eps/2)). MILE's splitting is U(eps/2) [K D K D K]
    U(eps/2) per step; here the two half refreshes that meet at a step boundary are merged
    into one of length (eps_open + eps)/2, which decorrelates u by the same factor.
    """
    if phase == "start":
        return [(KICK, MCLMC_B1 * eps_open), (UNIT_REFRESH, 0.5 * (eps_open + eps)),
                (KICK, MCLMC_B1 * eps), (DRIFT, 0.5 * eps)]
    if phase == "mid":
        return [(KICK, (1 - 2 * MCLMC_B1) * eps_open), (DRIFT, 0.5 * eps_open)]
    if phase == "closing":
        return [(KICK, MCLMC_B1 * eps_open), (UNIT_REFRESH, 0.5 * eps_open)]
    raise ValueError(f"unknown MCLMC phase {phase!r}")
