"""Autocorrelation time and split R-hat on series with known answers; probe parsing on a
synthetic sampling log written with RunLog."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rtllm.evaluation.diagnostics import (diagnose, integrated_autocorr_time, probe_autocorr, probe_rhat,
                               probe_trace, split_rhat)
from rtllm.store.runlog import RunLog, read_log


def ar1(phi: float, n: int, repeats: int, rng: np.random.Generator) -> np.ndarray:
    """Stationary AR(1) series [repeats, n] with unit variance; tau = (1 + phi) / (1 - phi)."""
    e = rng.standard_normal((n, repeats)) * math.sqrt(1 - phi * phi)
    x = np.empty((n, repeats))
    x[0] = rng.standard_normal(repeats)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + e[t]
    return x.T


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_tau_ar1_matches_exact(phi):
    n, repeats, c = 40_000, 8, 5.0
    exact = (1 + phi) / (1 - phi)
    rng = np.random.default_rng(123 + int(phi * 10))
    est = np.array([integrated_autocorr_time(x, c) for x in ar1(phi, n, repeats, rng)])
    # Sokal's variance of the windowed estimator: var(tau) ~ 2 (2M + 1) / n * tau^2, M ~ c tau
    # (sigma of one estimate: 0.023 for white noise, 0.12 at phi=0.5, 1.8 at phi=0.9).
    sigma = exact * math.sqrt(2 * (2 * c * exact + 1) / n)
    # Bias: centring at the sample mean lowers every rho by ~tau/n, i.e. tau by ~2 M tau / n
    # (0.07 at phi=0.9); truncating at M adds ~2 phi^M / (1 - phi), negligible here.
    bias = 2 * c * exact * exact / n
    assert abs(est.mean() - exact) < 4 * sigma / math.sqrt(repeats) + bias, (est, exact)
    # the stated sigma is the right size: the spread of the repeats agrees within 2x
    assert 0.5 * sigma < est.std(ddof=1) < 2 * sigma, (est.std(ddof=1), sigma)


def test_tau_edge_cases():
    assert math.isnan(integrated_autocorr_time(np.ones(100)))
    assert math.isnan(integrated_autocorr_time(np.array([1.0])))
    with pytest.raises(ValueError, match="1-D"):
        integrated_autocorr_time(np.zeros((3, 3)))


@pytest.mark.parametrize("n", [50, 200, 1000])
def test_short_series_cannot_show_long_tau(n):
    """Sokal's window caps tau at (n - 1) / c: a random walk (tau infinite) gets ~ n / 10.
    Hence probe_autocorr wants tau < n / 50 and also compares the chain's halves."""
    walk = np.cumsum(np.random.default_rng(n).standard_normal(n))
    tau = integrated_autocorr_time(walk, c=5.0)
    assert n / 20 < tau <= (n - 1) / 5
    assert not tau < n / 50


def rhat_reference(chains: list[np.ndarray]) -> float:
    """BDA3 split R-hat of one statistic, written out with plain loops."""
    n = min(len(c) for c in chains) // 2
    halves = [list(h) for c in chains for h in (c[:n], c[len(c) - n:])]
    m = len(halves)
    means = [sum(h) / n for h in halves]
    grand = sum(means) / m
    b = n / (m - 1) * sum((mu - grand) ** 2 for mu in means)
    w = sum(sum((v - mu) ** 2 for v in h) / (n - 1) for h, mu in zip(halves, means)) / m
    return math.sqrt(((n - 1) / n * w + b / n) / w)


def test_split_rhat_matches_reference():
    rng = np.random.default_rng(1)
    chains = [rng.standard_normal(n) + 0.3 * i for i, n in enumerate([11, 12, 15])]
    # split_rhat cuts every chain to the shortest (11 draws): halves [0:5] and [6:11]
    cut = [c[:11] for c in chains]
    np.testing.assert_allclose(split_rhat(chains), rhat_reference(cut), rtol=1e-12)


def test_split_rhat_same_distribution_near_one():
    rng = np.random.default_rng(2)
    chains = [ar1(0.9, 4000, 3, rng).T for _ in range(4)]  # 4 chains x 3 statistics, tau = 19
    rhat = split_rhat(chains)
    assert rhat.shape == (3,)
    # ~200 effective draws per half: R-hat - 1 is O(1/ESS), far below 0.05
    assert np.all(rhat < 1.05) and np.all(rhat > 0.99), rhat


def test_split_rhat_detects_shift_and_drift():
    rng = np.random.default_rng(3)
    same = [rng.standard_normal(1000) for _ in range(3)]
    shifted = same[:2] + [same[2] + 3.0]
    assert split_rhat(shifted) > 1.5
    # chains that agree with each other but drift within themselves: only the split sees it
    drift = [rng.standard_normal(1000) + np.linspace(0, 4, 1000) for _ in range(2)]
    assert split_rhat(drift) > 1.2
    # one chain: its two halves are compared
    assert split_rhat([drift[0]]) > 1.2
    assert abs(float(split_rhat([same[0]])) - 1) < 0.05


def test_split_rhat_errors_and_constant():
    with pytest.raises(ValueError, match="half-chains"):
        split_rhat([np.zeros(3), np.zeros(3)])
    with pytest.raises(ValueError, match="shape"):
        split_rhat([np.zeros((10, 2)), np.zeros((10, 3))])
    assert np.isnan(split_rhat([np.ones(10), np.ones(10)]))


# -- probes from a log ------------------------------------------------------------------------
P, TOP = 3, 5


def write_chain_log(path, rng, steps=200, burn_in=50, log_every=10, shift=0.0, resume_at=None):
    """A log shaped like SamplingRun's: step records, probes every log_every steps and at the
    last step; with resume_at, the steps from there on are logged a second time (a resume)."""
    log = RunLog(path)
    truth = {}

    def run(start, stop, offset):
        for t in range(start, stop):
            rec = {"type": "step", "step": t, "loss": 3.0, "angle": 0.01, "grad_norm": 1.0,
                   "ln_luminosity": 0.0, "phase": "burn-in" if t < burn_in else "sampling"}
            if t % log_every == 0 or t + 1 == steps:
                rec["heldout_loss"] = 3.1
                probs = np.clip(rng.uniform(0, 0.2, (P, TOP)) + shift + offset, 0, 1)
                truth[t] = probs.reshape(-1)
                log.write({"type": "probe", "step": t, "probs": probs.round(7).tolist()})
            log.write(rec)

    if resume_at is None:
        run(0, steps, 0.0)
    else:
        run(0, steps - 7, 0.5)          # killed after step steps-8...
        run(resume_at, steps, 0.0)      # ...resumed from the checkpoint at resume_at
    log.close()
    return truth


def test_probe_trace_parses_and_resume_wins(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "log-chain-000.jsonl"
    truth = write_chain_log(path, rng, resume_at=120)
    steps, values = probe_trace(read_log(path))
    assert steps.tolist() == list(range(0, 200, 10)) + [199]
    assert values.shape == (len(steps), P * TOP)
    np.testing.assert_allclose(values, np.stack([truth[s] for s in steps]), atol=1e-7)
    assert values[steps.tolist().index(130)].max() < 0.21  # the resumed record, not the first
    # NaN travels through the log as a string
    log = RunLog(tmp_path / "nan.jsonl")
    log.write({"type": "probe", "step": 0, "probs": [[float("nan")] * TOP]})
    log.close()
    assert np.isnan(probe_trace(read_log(tmp_path / "nan.jsonl"))[1]).all()


def test_probe_autocorr_grid_and_burn_in(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "log-chain-000.jsonl"
    write_chain_log(path, rng, steps=3001, burn_in=1000, log_every=10)
    out = probe_autocorr(path, burn_in_step=None)  # burn-in read from the log's phases
    chain = out["per_chain"][0]
    # probes at 1000, 1010, ..., 3000; the last step (3000) is on the grid here
    assert chain == {"burn_in_step": 1000, "interval_steps": 10, "n_points": 201,
                     "chain_length_steps": 2010}
    assert out["tau"].shape == (1, P * TOP) and out["n_probes"] == P * TOP
    np.testing.assert_allclose(out["tau_steps"], 10 * out["tau"])
    # independent draws: tau ~ 1 interval (sigma of one estimate sqrt(22 / 201) = 0.33,
    # so every one of the 15 is below n / 50 = 4.0)
    assert 0.7 < out["tau_median"] < 1.3
    assert out["fraction_converged"] == 1.0
    # halves of independent draws agree: R-hat - 1 ~ chi2_1 / (2 * 100), 1.1 is 20 of that
    assert out["fraction_stationary"] == 1.0 and out["rhat_within"].shape == (1, P * TOP)
    # records and paths give the same answer; burn_in_step=0 keeps everything but the
    # off-grid last probe of a 1000-step run
    assert probe_autocorr(read_log(path), burn_in_step=None)["tau_median"] == out["tau_median"]
    write_chain_log(tmp_path / "b.jsonl", rng, steps=1000)
    assert probe_autocorr(tmp_path / "b.jsonl")["per_chain"][0]["n_points"] == 100


def test_probe_autocorr_flags_a_drifting_chain(tmp_path):
    rng = np.random.default_rng(7)
    log = RunLog(tmp_path / "log-chain-000.jsonl")
    walk = np.cumsum(rng.standard_normal((300, P * TOP)), axis=0) * 0.01 + 0.5
    for i, row in enumerate(walk):
        log.write({"type": "probe", "step": 10 * i, "probs": row.reshape(P, TOP).tolist()})
    log.close()
    out = probe_autocorr(tmp_path / "log-chain-000.jsonl")
    assert out["fraction_converged"] < 0.2 and out["tau_median"] > 300 / 20
    assert out["rhat_within_max"] > 1.1


def test_diagnose_one_and_several_chains(tmp_path):
    rng = np.random.default_rng(6)
    write_chain_log(tmp_path / "log-chain-000.jsonl", rng, steps=2000)
    one = diagnose(tmp_path)
    assert one["n_chains"] == 1 and one["rhat_max"] is None and one["rhat_within_max"] < 1.1
    assert one["n_probes"] == P * TOP and one["chain_length_steps"] == 1950
    assert one["burn_in_step"] == [50] and one["fraction_converged"] == 1.0
    assert one["tau_median"] == pytest.approx(1.0, abs=0.3)

    write_chain_log(tmp_path / "log-chain-001.jsonl", rng, steps=2000)
    two = diagnose(tmp_path)
    assert two["n_chains"] == 2 and two["chains"] == [0, 1]
    assert two["rhat_max"] < 1.05  # 4 halves of 97 independent draws: R-hat - 1 ~ 0.005
    write_chain_log(tmp_path / "log-chain-002.jsonl", rng, steps=2000, shift=0.3)
    three = diagnose(tmp_path)
    assert three["rhat_max"] > 1.5
    rhat = probe_rhat(sorted(tmp_path.glob("log-chain-*.jsonl")), burn_in_step=None)
    assert rhat.shape == (P * TOP,) and three["rhat_max"] == pytest.approx(rhat.max())
    import json
    json.dumps(three)  # plain values only

    with pytest.raises(FileNotFoundError):
        diagnose(tmp_path / "nothing-here")
