"""The stationarity verdict (rtllm/samplers/stationarity.py) on series with known answers."""
import math

import numpy as np
import pytest

from rtllm.samplers.stationarity import TREND_Z, loss_trend, probe_ess, stationarity_verdict


def ar1(rng, n, phi=0.5, sd=0.05, level=3.0):
    """A stationary AR(1) series of stationary sd `sd` around `level`: tau = (1+phi)/(1-phi)."""
    e = rng.normal(0, sd * math.sqrt(1 - phi * phi), n)
    x = np.empty(n)
    x[0] = rng.normal(0, sd)
    for i in range(1, n):
        x[i] = phi * x[i - 1] + e[i]
    return level + x


def test_trend_recovers_a_known_slope_and_its_error_covers_it():
    """y = 3 - 2e-4 t + AR(1) noise over 40 points 10 steps apart: over 200 seeds the z-score of
    (estimate - truth) has sd near 1 if the tau-corrected error is right (measured ~1.0); with
    200 draws the sd of an sd estimate is ~5%; measured 1.23 over 400 seeds in a separate run
    (short series still underestimate tau a little), so 0.75..1.45 is > 4 sigma from both."""
    rng = np.random.default_rng(0)
    steps = np.arange(40) * 10.0
    zs = []
    for _ in range(200):
        t = loss_trend(steps, ar1(rng, 40) - 2e-4 * steps)
        zs.append((t.slope + 2e-4) / t.stderr)
    zs = np.array(zs)
    print(f"sd of z {zs.std():.3f}, mean {zs.mean():+.3f}")
    assert 0.75 < zs.std() < 1.45 and abs(zs.mean()) < 0.3  # mean: sd 1/sqrt(200) = 0.07, > 4 sigma


def test_stationary_chains_are_rarely_called_moving():
    """200 seeds of a stationary AR(1) chain (40 points, tau = 3): the verdict calls at most 5%
    of them moving (the nominal two-sided rate at |z| = 3 is 0.3%; tau estimated from 40 points
    widens it; measured 2% over 400 seeds). A binomial(200, 0.02) exceeds 10 with p < 1%."""
    rng = np.random.default_rng(1)
    moving = 0
    for _ in range(200):
        v = stationarity_verdict([(np.arange(40) * 20, ar1(rng, 40))])
        moving += not v.stationary
    print(f"false alarms {moving}/200")
    assert moving <= 10


def test_a_descending_chain_is_called_moving_with_advice():
    """Drift of 0.15 nats over the kept samples against noise 0.03: z ~ -10 or beyond."""
    rng = np.random.default_rng(2)
    steps = np.arange(20) * 15
    loss = 4.9 - 0.15 * steps / steps[-1] + rng.normal(0, 0.03, 20)
    v = stationarity_verdict([(steps, loss)], undone_steps=3, sampling_steps=300)
    assert v.stationary is False and v.trend_z < -TREND_Z and v.drift_nats < -0.1
    assert "STILL MOVING (descending)" in v.message and "--burn-in" in v.message and "--steps" in v.message
    assert v.undo_rate == pytest.approx(0.01) and "undo rate 0.010" in v.message
    assert v.rhat > 1.1 and "WARNING" not in v.message
    bouncing = stationarity_verdict([(steps, loss)], undone_steps=150, sampling_steps=300)
    assert "WARNING: 50% of the steps were undone" in bouncing.message


def test_chains_at_different_levels_fail_rhat_without_a_trend():
    rng = np.random.default_rng(3)
    steps = np.arange(30) * 10
    v = stationarity_verdict([(steps, ar1(rng, 30, level=3.0)), (steps, ar1(rng, 30, level=3.3))])
    assert abs(v.trend_z) < TREND_Z and v.rhat > 1.5 and v.stationary is False and v.n_chains == 2


def test_too_few_points_give_no_verdict_and_json_has_no_nan():
    v = stationarity_verdict([(np.arange(3), np.array([3.0, 2.9, 2.8]))])
    assert v.stationary is None and "no verdict" in v.message and "--steps" in v.message
    j = v.to_json()
    assert j["trend_z"] is None and j["undo_rate"] is None and j["n_points"] == 3


def test_probe_ess_counts_independent_draws():
    """White noise: ESS ~ n per chain, summed over chains (Sokal's tau of white noise ~1;
    measured within 10%). A random walk: far fewer."""
    rng = np.random.default_rng(4)
    white = [rng.normal(size=(400, 6)) for _ in range(2)]
    assert 700 < probe_ess(white) <= 800
    walk = [np.cumsum(rng.normal(size=(400, 6)), 0)]
    assert probe_ess(walk) < 40
    assert math.isnan(probe_ess([])) and math.isnan(probe_ess([np.ones((10, 3))]))


def test_bad_input():
    with pytest.raises(ValueError, match="at least one chain"):
        stationarity_verdict([])
