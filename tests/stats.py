"""Effective sample size and z-scores for seeded statistical tests of MCMC chains.

Multi-chain ESS: the autocorrelation of one statistic pooled over many independent chains
(centred at the grand mean, so between-chain differences count), summed with Geyer's initial
monotone sequence (Geyer 1992). With a few hundred chains of a few hundred draws each the ESS
is estimated to a few per cent, so z = (estimate - truth) / (sd / sqrt(ESS)) is N(0, 1) to
that accuracy for a correct sampler.
"""
from __future__ import annotations

import numpy as np


def _autocorr(x: np.ndarray) -> np.ndarray:
    """Autocorrelation at lags 0..n-1 of chains x [n, chains], pooled over chains.

    Centred at the grand mean, not at each chain's mean: the chains share one stationary law,
    and per-chain centring biases every lag by ~ -tau/n (10% too large an ESS for an
    antithetic chain of 400 draws). A chain stuck away from the others then shows up as
    positive correlation at all lags, i.e. a small ESS, as it should.
    """
    n = x.shape[0]
    xc = x - x.mean()
    size = 2 ** int(np.ceil(np.log2(2 * n)))  # zero-padding: linear, not circular, correlation
    f = np.fft.rfft(xc, size, axis=0)
    acov = np.fft.irfft(f * np.conj(f), size, axis=0)[:n].mean(1)
    return acov / acov[0] if acov[0] > 0 else np.zeros(n)


def ess(x: np.ndarray) -> np.ndarray:
    """Effective sample size of the pooled mean of x [n draws, chains, ...stats] per statistic."""
    x = np.asarray(x, dtype=np.float64)
    n, m = x.shape[:2]
    flat = x.reshape(n, m, -1)
    out = np.array([_ess_one(flat[:, :, j]) for j in range(flat.shape[2])])
    return out.reshape(x.shape[2:])


def _ess_one(x: np.ndarray) -> float:
    n, m = x.shape
    rho = _autocorr(x)
    # Geyer's initial monotone sequence: sums of adjacent pairs are positive and decreasing
    # for a reversible chain; stop at the first non-positive pair, enforce monotonicity.
    pairs = rho[: 2 * (n // 2)].reshape(-1, 2).sum(1)
    stop = int(np.argmax(pairs <= 0)) if np.any(pairs <= 0) else len(pairs)
    tau = -1.0 + 2.0 * np.minimum.accumulate(pairs[:stop]).sum()
    tau = max(tau, 1.0 / np.log10(max(n * m, 10)))  # Stan's cap against antithetic overshoot
    return float(n * m / tau)


def z_scores(values: np.ndarray, truth) -> tuple[np.ndarray, np.ndarray]:
    """z of the pooled mean of values [n, chains, ...] against truth, and the ESS used."""
    values = np.asarray(values, dtype=np.float64)
    e = ess(values)
    est = values.mean((0, 1))
    sd = values.reshape(-1, *values.shape[2:]).std(0, ddof=1)
    return (est - np.asarray(truth)) / (sd / np.sqrt(e)), e
