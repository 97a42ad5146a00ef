"""Autocorrelation of a scalar series and Sokal's integrated autocorrelation time.

Used by the MCLMC tuner (phase III) and by the evaluation's convergence diagnostics.
"""
from __future__ import annotations

import math

import numpy as np


def autocorrelation(x: np.ndarray) -> np.ndarray:
    """Normalized autocorrelation rho(0..n-1) of a 1-D series, via FFT (zeros if constant).

    The autocovariance uses the 1/n (biased) normalization: it is positive semi-definite and
    has a smaller mean squared error than 1/(n-t) at the lags Sokal's window reaches.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    xc = x - x.mean()
    size = 2 ** int(np.ceil(np.log2(2 * n)))  # zero-padding: linear, not circular, correlation
    f = np.fft.rfft(xc, size)
    acov = np.fft.irfft(f * np.conj(f), size)[:n] / n
    return acov / acov[0] if acov[0] > 0 else np.zeros(n)


def integrated_autocorr_time(x: np.ndarray, c: float = 5.0) -> float:
    """Sokal's windowed estimate of tau = 1 + 2 sum_t rho(t), in units of the series' spacing.

    The window M is the smallest with M >= c * tau(M) (Sokal 1989). One always exists: after
    centring at the sample mean the autocovariances sum to zero, so tau(n - 1) = 0. Hence
    tau <= (n - 1) / c whatever the series: a short series cannot reveal a long tau (a random
    walk of n points gets tau ~ n / 10), which is why `probe_autocorr` asks for tau well below
    n / c and also compares each chain's halves. NaN for a constant series or < 2 points.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D series, got shape {x.shape}")
    if len(x) < 2 or not np.all(np.isfinite(x)):
        return math.nan
    rho = autocorrelation(x)
    if rho[0] == 0:
        return math.nan
    taus = 2.0 * np.cumsum(rho) - 1.0  # taus[M] = 1 + 2 * sum_{t=1..M} rho(t)
    ok = np.arange(len(taus)) >= c * taus
    return float(taus[int(np.argmax(ok))])
