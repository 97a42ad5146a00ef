"""Scalar rules (rtllm/samplers/rules.py) against explicit float64 / mpmath geometry.

The kick references below never use the rules' cos/tau algebra: they build the rotated velocity
from the vectors themselves (angle by atan2 of the perpendicular and parallel parts, exact in
mpmath at 40 digits), so they check the formulas as well as their numerics.

Numerics that set the tolerances (eps = 2.2e-16): the rules see only vv, gg, vg, so
c = cos(theta) is known to a few eps *absolutely*. Near theta = pi (v along +g), 1 + c is then
known only to eps / (1 + c) relatively, and the kick amplifies v's perpendicular part by
a = sin(theta')/sin(theta) ~ 1/sin(theta): errors of order eps / (1 + c) there are inherent to
the six-sum interface, not to the implementation. Everywhere else the rules are good to ~1e-15.
"""
import math

import mpmath
import numpy as np
import pytest

from rtllm.samplers import rules
EPS = np.finfo(np.float64).eps
mp = mpmath.MPContext()  # a private 40-digit context (mpmath ships with torch, via sympy)
mp.dps = 40


# ----------------------------------------------------------------------- references
def ref_ray_kick(v, g, h, scale, dim):
    """Exact ray kick of the float64 vectors v, g (not parallel): (v', d_ln_lum, k, cos theta)."""
    V = [mp.mpf(float(x)) for x in v]
    G = [mp.mpf(float(x)) for x in g]
    vv, gg = mp.fsum(x * x for x in V), mp.fsum(x * x for x in G)
    vg = mp.fsum(a * b for a, b in zip(V, G))
    mn, gn = mp.sqrt(vv), mp.sqrt(gg)
    perp = [a - vg / gg * b for a, b in zip(V, G)]  # v minus its projection on g
    pn = mp.sqrt(mp.fsum(x * x for x in perp))
    assert pn > 0, "reference needs non-parallel v, g"
    theta = mp.atan2(pn, -vg / gn)  # angle between v and -g, stable at 0 and pi
    k = mp.mpf(h) * mn * gn * mp.mpf(scale) / (dim - 1)
    theta_new = 2 * mp.atan(mp.tan(theta / 2) * mp.exp(-k))
    v_new = [mn * (mp.cos(theta_new) * (-b / gn) + mp.sin(theta_new) * p / pn) for b, p in zip(G, perp)]
    d_ln_lum = (dim - 1) * mp.log(mp.sin(theta) / mp.sin(theta_new))
    return np.array([float(x) for x in v_new]), float(d_ln_lum), float(k), float(mp.cos(theta))


def sums_of(v, g, n=None):
    n = np.zeros_like(v) if n is None else n
    return np.array([v @ v, g @ g, v @ g, n @ n, n @ v, n @ g])


def kick(v, g, h, scale, dim, rule=rules.ray_kick):
    """Apply a rule to explicit vectors: (v', d_ln_lum)."""
    vv, gg, vg = (np.array([s]) for s in sums_of(v, g)[:3])
    a, b, d = rule(vv, gg, vg, h, scale, np.array([float(dim)]))
    return a[0] * v + b[0] * g, float(d[0])


def pair(kind, dim, rng):
    """(v, g) with the angle between v and -g generic, ~1e-4, or ~pi - 1e-4."""
    v = rng.standard_normal(dim) * 1.7
    if kind == "generic":
        return v, rng.standard_normal(dim) * 0.6
    theta = {"near_parallel": 1e-4, "near_antiparallel": math.pi - 1e-4}[kind]
    w = rng.standard_normal(dim)
    w -= (w @ v) / (v @ v) * v
    w /= np.linalg.norm(w)
    return v, -(math.cos(theta) * v / np.linalg.norm(v) + math.sin(theta) * w) * 0.6


def inherent_rtol(c):
    """Relative error forced by knowing c only to a few eps (module docstring)."""
    return 1e-13 + 16 * EPS / (1 + c)


KS = [float(k) for k in np.logspace(-12, 1, 14)] + [30.0]  # k = 1e-12 .. 10, and one huge kick
SCALE = 2.5


# ------------------------------------------------------------------------ ray kick
@pytest.mark.parametrize("dim", [2, 5, 1000])
@pytest.mark.parametrize("kind", ["generic", "near_parallel", "near_antiparallel"])
def test_ray_kick_matches_explicit_rotation(kind, dim):
    rng = np.random.default_rng([dim, len(kind)])
    for k_target in KS:
        v, g = pair(kind, dim, rng)
        h = k_target * (dim - 1) / (np.linalg.norm(v) * np.linalg.norm(g) * SCALE)
        v_new, d = kick(v, g, h, SCALE, dim)
        v_ref, d_ref, k, c = ref_ray_kick(v, g, h, SCALE, dim)
        rtol = inherent_rtol(c)  # 1e-13 away from theta ~ pi; 7e-7 at theta = pi - 1e-4
        mn = np.linalg.norm(v)
        assert np.linalg.norm(v_new - v_ref) <= rtol * mn, (k, c)
        assert abs(np.linalg.norm(v_new) - mn) <= rtol * mn  # the kick keeps |v|
        # d_ln_lum is O((D-1) k) and must be accurate relative to that even at k = 1e-12.
        assert abs(d - d_ref) <= rtol * (dim - 1) * k, (k, c, d, d_ref)


def test_tiny_kicks_need_the_log1p_form():
    """At k = 1e-12 the naive (D-1) log(sin theta / sin theta') keeps ~4 digits; the rule ~15."""
    rng = np.random.default_rng(7)
    dim, naive_err, rule_err = 50, [], []
    for _ in range(5):
        v, g = pair("generic", dim, rng)
        mn, gn = np.linalg.norm(v), np.linalg.norm(g)
        h = 1e-12 * (dim - 1) / (mn * gn * SCALE)
        _, d = kick(v, g, h, SCALE, dim)
        _, d_ref, k, _ = ref_ray_kick(v, g, h, SCALE, dim)
        c = -(v @ g) / (mn * gn)
        tau = math.sqrt((1 - c) / (1 + c)) * math.exp(-k)
        naive = (dim - 1) * math.log(math.sqrt(1 - c * c) / (2 * tau / (1 + tau * tau)))
        naive_err.append(abs(naive - d_ref) / ((dim - 1) * k))
        rule_err.append(abs(d - d_ref) / ((dim - 1) * k))
    assert max(rule_err) < 1e-13
    assert max(naive_err) > 1e-6  # log of 1 + O(1e-12): absolute eps becomes relative ~1e-4


@pytest.mark.parametrize("dim", [2, 7])
@pytest.mark.parametrize("k", [1e-12, 1e-6, 1e-2, 1.0])
@pytest.mark.parametrize("lam", [-2.0, -0.5, 0.25, 4.0])  # powers of two: v = lam*g exactly
def test_ray_kick_exactly_parallel(lam, k, dim):
    """sin(theta) = 0: v unchanged, d_ln_lum = h |v| |g| S c = (D-1) k c with c = -sign(lam)."""
    rng = np.random.default_rng([dim, len(str(k))])
    for _ in range(8):  # different roundings of c = -vg/(|v||g|) to +-1 or +-(1 - ulp)
        g = rng.standard_normal(dim)
        v = lam * g
        h = k * (dim - 1) / (np.linalg.norm(v) * np.linalg.norm(g) * SCALE)
        v_new, d = kick(v, g, h, SCALE, dim)
        assert np.linalg.norm(v_new - v) <= 1e-13 * np.linalg.norm(v)
        assert d == pytest.approx(-math.copysign(1.0, lam) * (dim - 1) * k, rel=1e-13)


@pytest.mark.parametrize("k", [10.0, 15.0, 30.0])
@pytest.mark.parametrize("lam", [-2.0, -0.5, 0.25, 4.0])  # v = lam*g exactly
def test_ray_kick_exactly_parallel_strong_kick(lam, k):
    """theta = 0 and theta = pi are fixed points (algorithms.md: v unchanged, d = (D-1) k c).

    Regression (this failed for lam > 0, v along +g, theta = pi, and k >= 15, before the kick
    switched to the logaddexp form and treated sin(theta) < 1e-7 as parallel):
    - c rounds to -1 or -1 + ulp; then 1 + 0.5 (1 - c) expm1(-2k) = e^(-2k) + O(eps) loses all
      digits once e^(-2k) < eps (k >~ 18): d_ln_lum is off by 1e-5 relative at k = 15 and
      is -inf from k ~ 19, which makes the Metropolis log-ratio +inf (always accept);
    - when c rounds to -1 + ulp the rule sees sin(theta) ~ 1.5e-8 and rotates a perpendicular
      part that is not there: a ~ e^k blows it up and |v'| is not |v| (at k = 18.7, v' ~ 0;
      beyond, v' ~ -v). At k = 10 the same error is ~1e-7 |v|, hence the loose 1e-6 here.
    """
    dim = 7
    rng = np.random.default_rng(3)
    for _ in range(8):
        g = rng.standard_normal(dim)
        v = lam * g
        h = k * (dim - 1) / (np.linalg.norm(v) * np.linalg.norm(g) * SCALE)
        v_new, d = kick(v, g, h, SCALE, dim)
        assert np.linalg.norm(v_new - v) <= 1e-6 * np.linalg.norm(v)
        assert d == pytest.approx(-math.copysign(1.0, lam) * (dim - 1) * k, rel=1e-6)


def test_ray_kick_keeps_speed_for_a_batch_of_rays():
    """Vectorized over rays with their own D: |a v + b g| = |v| from the Gram matrix."""
    rng = np.random.default_rng(11)
    n = 20000
    dims = rng.integers(2, 60, n).astype(np.float64)
    vv = rng.chisquare(dims) * 0.3
    gg = rng.chisquare(dims) * 5.0
    u = rng.uniform(-1, 1, n)
    c = np.sign(u) * (1 - np.abs(u) ** 3)  # many rays near theta = 0 and pi (1 + c down to 1e-13)
    vg = -c * np.sqrt(vv * gg)
    k = 10 ** rng.uniform(-12, 1, n)
    h = k * (dims - 1) / np.sqrt(vv * gg)
    a, b, d = rules.ray_kick(vv, gg, vg, h, 1.0, dims)
    speed2 = a * a * vv + 2 * a * b * vg + b * b * gg
    assert np.all(np.abs(speed2 / vv - 1) <= 2 * inherent_rtol(c))
    # The angle moves towards -g, never past it (theta' <= theta), so d_ln_lum >= 0 for theta <= pi/2.
    new_c = -(a * vg + b * gg) / np.sqrt(vv * gg)
    assert np.all(new_c >= c - 1e-12)
    assert np.all(d[c >= 0] >= 0)


def test_ray_kick_zero_gradient_or_velocity_is_a_no_op():
    vv = np.array([2.0, 0.0, 3.0])
    gg = np.array([0.0, 4.0, 0.0])
    vg = np.zeros(3)
    a, b, d = rules.ray_kick(vv, gg, vg, 0.1, 1.0, np.array([5.0, 5.0, 2.0]))
    assert np.all(a == 1) and np.all(b == 0) and np.all(d == 0)


# ------------------------------------------------------------------------ HMC kick
def test_hmc_kick_kinetic_energy_change():
    rng = np.random.default_rng(5)
    for dim in (1, 3, 400):
        v, g = rng.standard_normal(dim), rng.standard_normal(dim) * 3
        h, scale = 0.37, 1.9
        v_new, d = kick(v, g, h, scale, dim, rule=rules.hmc_kick)
        np.testing.assert_allclose(v_new, v - h * scale * g, rtol=0, atol=1e-15 * np.abs(v_new).max())
        assert d == pytest.approx(0.5 * (v_new @ v_new - v @ v), rel=1e-12, abs=1e-13 * (v @ v))


# ------------------------------------------------------------------------- refresh
@pytest.mark.parametrize("mom_norm", [1.0, 0.3])
def test_refresh_coefficients_are_an_exact_rotation(mom_norm):
    for x in [0.0, 1e-300, 1e-12, 1e-8, 1e-3, 0.1, 1.0, 5.0, 40.0]:
        for rate, h in ((x, 1.0), (1.0, x), (-x, 1.0), (1.0, -x)):
            f, s = rules.refresh_coefficients(h, rate, mom_norm)
            assert abs(f * f + (s / mom_norm) ** 2 - 1) <= 2 * EPS
            exact = mp.sqrt(-mp.expm1(-2 * mp.mpf(x)))  # sqrt(1 - f^2)
            assert s / mom_norm == pytest.approx(float(exact), rel=4 * EPS)
            assert f == pytest.approx(math.exp(-x), rel=EPS)
    # The naive sqrt(1 - f^2) keeps ~4 digits at rate*h = 1e-12; the rule is exact to eps.
    f, _ = rules.refresh_coefficients(1e-12, 1.0, 1.0)
    assert abs(math.sqrt(1 - f * f) / math.sqrt(2e-12) - 1) > 1e-6


def test_refresh_keeps_the_momentum_distribution_and_relaxes_at_rate_f():
    """v <- f v + s n on 2e6 independent coordinates: N(0, m^2) invariant, lag-1 corr = f."""
    rng = np.random.default_rng(2024)
    n, m, steps = 2_000_000, 0.7, 12
    f, s = rules.refresh_coefficients(0.4, 0.5, m)  # rate * h = 0.2
    v = rng.standard_normal(n) * m
    prev = v
    for _ in range(steps):
        prev, v = v, f * v + s * rng.standard_normal(n)
    # Sample variance of n iid N(0, m^2): sd m^2 sqrt(2/n) = 1e-3 relative; 4.5 sigma.
    assert abs(v.var() / m**2 - 1) < 4.5 * math.sqrt(2 / n)
    assert abs(v.mean()) < 4.5 * m / math.sqrt(n)  # sd of the mean m/sqrt(n)
    # Lag-1 correlation of the stationary OU chain is f; its estimate has sd (1 - f^2)/sqrt(n).
    assert abs(np.corrcoef(prev, v)[0, 1] - f) < 4.5 * (1 - f * f) / math.sqrt(n)
    # From a 3x too wide start, var_t = m^2 (1 + 8 f^(2t)): checks f's value, not only invariance.
    v = rng.standard_normal(n) * 3 * m
    for _ in range(steps):
        v = f * v + s * rng.standard_normal(n)
    expect = m**2 * (1 + 8 * f ** (2 * steps))
    # sd of a sample variance of Gaussians: var * sqrt(2/n); 4.5 sigma.
    assert abs(v.var() / expect - 1) < 4.5 * math.sqrt(2 / n)


# ------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("rate", [0.0, 0.8])
def test_step_schedule_durations(rate):
    dt = 0.3
    for phase, (kick_t, refresh_t, drift_t) in {
        "first": (dt / 2, dt / 2, dt),
        "steady": (dt, dt, dt),
        "closing": (dt / 2, dt / 2, 0.0),
    }.items():
        sched = rules.step_schedule(phase, dt, rate)
        total = {op: sum(h for o, h in sched if o == op) for op in (rules.KICK, rules.REFRESH, rules.DRIFT)}
        assert total[rules.KICK] == pytest.approx(kick_t)
        assert total[rules.REFRESH] == pytest.approx(refresh_t if rate else 0.0)
        assert total[rules.DRIFT] == pytest.approx(drift_t)
        assert rules.needs_noise(sched) == (rate > 0)


def apply_schedule(schedule, v, g, n, *, kick_name, scale, dim, rate, mom_norm):
    """Operations one by one on explicit float64 vectors: (v_final, d_ln_lum, delta)."""
    d_total, delta = 0.0, 0.0
    for op, h in schedule:
        if op == rules.KICK:
            if not np.any(g):
                continue  # zero gradient: no kick
            if kick_name == "ray":
                v, d = ref_ray_kick(v, g, h, scale, dim)[:2]
            else:
                v_new = v - h * scale * g
                v, d = v_new, 0.5 * (v_new @ v_new - v @ v)
            d_total += d
        elif op == rules.REFRESH:
            f = 0.0 if h == rules.FULL_REFRESH else math.exp(-abs(rate * h))
            v = f * v + math.sqrt(1 - f * f) * mom_norm * n
        else:
            delta = h
    return v, d_total, delta


SCHEDULES = [(phase, rate) for phase in ("first", "steady", "closing") for rate in (0.0, 0.9)]


@pytest.mark.parametrize("kick_name", ["ray", "hmc"])
@pytest.mark.parametrize("phase, rate", SCHEDULES + [("full_refresh", 0.0), ("two_kicks", 0.0)])
def test_compose_equals_operations_one_by_one(phase, rate, kick_name):
    """Six sums -> (alpha, beta, gamma, delta, d_ln_lum) reproduce the explicit step, for a
    batch of rays with different D (one with a zero gradient)."""
    dt, scale, mom_norm = 0.21, 1.7, (0.6 if kick_name == "ray" else 1.0)
    schedule = {
        "full_refresh": [(rules.REFRESH, rules.FULL_REFRESH), (rules.KICK, dt / 2), (rules.DRIFT, dt)],
        "two_kicks": [(rules.KICK, dt / 3), (rules.KICK, dt)],
    }.get(phase) or rules.step_schedule(phase, dt, rate)
    rng = np.random.default_rng([len(phase), int(rate * 10), len(kick_name)])
    dims = [2, 3, 17, 100, 9]
    vecs = []
    for i, dim in enumerate(dims):
        v = rng.standard_normal(dim) * mom_norm
        g = np.zeros(dim) if i == 4 else rng.standard_normal(dim) * 2.0
        vecs.append((v, g, rng.standard_normal(dim)))
    sums = np.stack([sums_of(v, g, n) for v, g, n in vecs])
    coef = rules.compose(schedule, sums, kick=rules.ray_kick if kick_name == "ray" else rules.hmc_kick,
                         scale=scale, dim=np.array(dims, float), refresh_rate=rate, mom_norm=mom_norm)
    for i, ((v, g, n), dim) in enumerate(zip(vecs, dims)):
        v_ref, d_ref, delta = apply_schedule(schedule, v, g, n, kick_name=kick_name, scale=scale,
                                             dim=dim, rate=rate, mom_norm=mom_norm)
        v_new = coef.alpha[i] * v + coef.beta[i] * g + coef.gamma[i] * n
        scale_v = max(np.linalg.norm(v), mom_norm * np.linalg.norm(n))
        assert np.linalg.norm(v_new - v_ref) <= 1e-12 * scale_v, (phase, i)
        assert coef.d_ln_lum[i] == pytest.approx(d_ref, rel=1e-11, abs=1e-13 * dim)
        assert coef.delta == delta


def test_compose_rejects_malformed_schedules():
    sums = np.ones((1, 6))
    kw = dict(kick=rules.ray_kick, scale=1.0, dim=np.array([3.0]), refresh_rate=1.0, mom_norm=1.0)
    with pytest.raises(ValueError, match="refresh once"):
        rules.compose([(rules.REFRESH, 0.1), (rules.REFRESH, 0.1)], sums, **kw)
    with pytest.raises(ValueError, match="drift must be the last"):
        rules.compose([(rules.DRIFT, 0.1), (rules.KICK, 0.1)], sums, **kw)
    with pytest.raises(ValueError, match="unknown"):
        rules.compose([("X", 0.1)], sums, **kw)
