"""Is a chain stationary? A verdict from the held-out loss at the kept samples and a probe trace.

Pure arithmetic over arrays (the run and the evaluation read them from the run log, see
`rtllm.store.log_series`). Three figures, each answering a different way a chain can be
still moving (docs/uncertainty.md, "The stationarity verdict"):

- the trend: the least-squares slope of the held-out loss over the kept samples, against its
  standard error. The residuals of a chain are autocorrelated, so the error of the slope is
  the white-noise one times sqrt(tau), tau = (1 + r) / (1 - r) from the residuals' lag-1
  autocorrelation r (an AR(1) model; r with Kendall's small-sample correction + (1 + 3r) / n).
  On the short series a run has (tens of points), Sokal's windowed tau came out far too small
  (slope z-scores with sd 1.7 instead of 1 at 40 points of an AR(1) with tau = 3); the AR(1)
  form gives sd 1.0-1.2 there. A descending chain (the usual case: a start that is not yet at the mode) shows a
  significant negative slope, and then the spread between its samples is mostly drift.
- split R-hat of the held-out loss over the halves of every chain and across chains: chains
  that sit at different levels disagree. It counts in the verdict with two or more chains only:
  within one chain of tens of autocorrelated points it exceeds 1.1 by chance too often
  (18% of stationary AR(1) chains of 40 points, tau = 3), and a drift is the trend's to find.
- the effective sample size of the probe trace (function-space statistics, median over the
  probed probabilities, summed over chains): how many independent draws the samples are.

The verdict is "stationary" when the trend is not significant (|z| < TREND_Z) and, with several
chains, R-hat is below MAX_RHAT; otherwise "still moving", with what to do.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from rtllm.samplers.autocorr import integrated_autocorr_time

MAX_LAG1 = 0.95  # cap on the residuals' lag-1 autocorrelation: tau <= 39

# |slope / SE| above this is a trend. 3 rather than 2: the SE uses an estimated tau, and a
# stationary chain should rarely be told to run longer (two-sided normal tail at 3: 0.3%).
TREND_Z = 3.0
MAX_RHAT = 1.1  # split R-hat of the held-out loss above this: the halves or chains disagree
MIN_POINTS = 4  # fewer held-out points than this: no verdict on the trend
# Undo rate above this: the message warns (measured 0.5 with --scale tokens and no prior on a
# 0.17M-parameter model, docs/uncertainty.md: the chain bounces instead of moving).
HIGH_UNDO_RATE = 0.2


def split_rhat(chains: list[np.ndarray]) -> np.ndarray:
    """Split-chain Gelman-Rubin R-hat per statistic (BDA3 section 11.4).

    chains: arrays [n_i, ...stats], one per chain. They are cut to the shortest length N,
    each is split into a first and a last half of N // 2 draws (the middle draw of an odd N
    is dropped), and the classic potential scale reduction is computed over the 2 * chains
    halves. Splitting makes a drift inside one chain show up as disagreement between its
    halves. Returns shape [...stats]; NaN where every half is constant.
    """
    if len(chains) == 0:
        raise ValueError("split_rhat needs at least one chain")
    arrays = [np.asarray(c, dtype=np.float64) for c in chains]
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"chains disagree on the statistic shape: {sorted(shapes)}")
    total = min(len(a) for a in arrays)
    n = total // 2
    if n < 2:
        raise ValueError(f"split R-hat needs >= 2 half-chains of >= 2 draws; the shortest "
                         f"chain has {total} draws")
    halves = np.stack([h for a in arrays for h in (a[:n], a[total - n:total])])  # [m, n, ...]
    means = halves.mean(axis=1)
    within = halves.var(axis=1, ddof=1).mean(axis=0)           # W
    between = n * means.var(axis=0, ddof=1)                    # B
    var_plus = (n - 1) / n * within + between / n
    with np.errstate(divide="ignore", invalid="ignore"):
        rhat = np.sqrt(var_plus / within)
    return np.where(within > 0, rhat, np.nan)


@dataclass(frozen=True)
class Trend:
    """Least-squares slope of y over x with an autocorrelation-aware standard error."""

    slope: float  # per unit of x (steps)
    stderr: float
    z: float  # slope / stderr (nan when undefined)
    drift: float  # slope * (x[-1] - x[0]): the change the fit puts over the whole span
    noise: float  # standard deviation of the residuals
    tau: float  # AR(1) autocorrelation time of the residuals, in points (>= 1)


def loss_trend(steps: np.ndarray, values: np.ndarray) -> Trend:
    """The trend of one chain's held-out loss over its kept samples."""
    x, y = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    if n < MIN_POINTS or np.ptp(x) == 0:
        return Trend(*(math.nan,) * 5, tau=math.nan)
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    resid = y - y.mean() - slope * xc
    noise = float(resid.std(ddof=2)) if n > 2 else math.nan
    power = float((resid * resid).sum())
    lag1 = float((resid[1:] * resid[:-1]).sum()) / power if power > 0 else 0.0
    lag1 = min(max(lag1 + (1 + 3 * lag1) / n, 0.0), MAX_LAG1)  # antithetic: no credit beyond n points
    tau = (1 + lag1) / (1 - lag1)
    stderr = noise * math.sqrt(tau / (xc * xc).sum())
    z = slope / stderr if stderr > 0 else (0.0 if slope == 0 else math.copysign(math.inf, slope))
    return Trend(slope=slope, stderr=stderr, z=float(z), drift=slope * float(x[-1] - x[0]),
                 noise=noise, tau=float(tau))


def probe_ess(traces: Sequence[np.ndarray]) -> float:
    """Effective sample size of a probe trace: per probed statistic, the sum over chains of
    n / tau (Sokal), then the median over the statistics. traces: [n_i, stats] per chain."""
    per_stat = None
    for trace in traces:
        t = np.asarray(trace, dtype=np.float64)
        if t.ndim != 2 or len(t) < 2:
            continue
        taus = np.array([integrated_autocorr_time(t[:, j]) for j in range(t.shape[1])])
        ess = len(t) / np.maximum(taus, 1.0)  # nan where a statistic is constant
        per_stat = ess if per_stat is None else per_stat + ess
    if per_stat is None or not np.isfinite(per_stat).any():
        return math.nan
    return float(np.nanmedian(per_stat))


@dataclass(frozen=True)
class StationarityVerdict:
    stationary: bool | None  # None: too few held-out points to judge
    n_chains: int
    n_points: int  # held-out loss points judged, all chains
    slope_per_1k_steps: float  # mean over chains
    trend_z: float  # the chain with the largest |z|
    drift_nats: float  # fitted change of held-out loss over the kept samples (mean over chains)
    noise_nats: float  # sd of the held-out loss around the fit (mean over chains)
    rhat: float  # split R-hat of the held-out loss (halves of every chain, across chains)
    probe_ess: float
    undo_rate: float  # undone steps / steps of the sampling phase (nan when none)
    message: str

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def _finite(values) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def stationarity_verdict(heldout: Sequence[tuple[np.ndarray, np.ndarray]],
                         probes: Sequence[np.ndarray] = (), *, undone_steps: int = 0,
                         sampling_steps: int = 0) -> StationarityVerdict:
    """The verdict over one or more chains.

    heldout: per chain, (steps, held-out loss) at the kept samples. probes: per chain, the
    probe trace [n, stats] after the burn-in. undone_steps / sampling_steps: for the undo rate.
    """
    if not heldout:
        raise ValueError("the stationarity verdict needs the held-out loss of at least one chain")
    trends = [loss_trend(s, v) for s, v in heldout]
    n_points = sum(int(np.isfinite(np.asarray(v, dtype=np.float64)).sum()) for _, v in heldout)
    zs = _finite(t.z for t in trends)
    z = max(zs, key=abs) if zs else math.nan
    series = [np.asarray(v, dtype=np.float64)[np.isfinite(np.asarray(v, dtype=np.float64))] for _, v in heldout]
    try:
        rhat = float(split_rhat([s[:, None] for s in series])[0])
    except ValueError:
        rhat = math.nan

    def mean_of(name: str) -> float:
        vals = _finite(getattr(t, name) for t in trends)
        return float(np.mean(vals)) if vals else math.nan

    slope, drift, noise = mean_of("slope") * 1000.0, mean_of("drift"), mean_of("noise")
    undo_rate = undone_steps / sampling_steps if sampling_steps > 0 else math.nan
    ess = probe_ess(probes)
    if not zs:
        stationary = None
        message = (f"stationarity: no verdict, {n_points} held-out loss points (need >= {MIN_POINTS} "
                   f"per chain): raise --steps or lower --thin")
    else:
        moving = abs(z) >= TREND_Z or (len(heldout) > 1 and math.isfinite(rhat) and rhat > MAX_RHAT)
        stationary = not moving
        figures = (f"held-out loss drift {drift:+.4f} nats over the kept samples (noise {noise:.4f}, "
                   f"trend z {z:+.1f}), split R-hat {rhat:.3f}, probe ESS {ess:.1f}, "
                   f"undo rate {undo_rate:.3f}")
        if moving:
            way = "descending" if drift < 0 else "rising"
            message = (f"stationarity: STILL MOVING ({way}): {figures}. The spread between samples "
                       f"is partly drift, not posterior width: raise --burn-in (or --burn-in auto) "
                       f"and --steps")
        else:
            message = f"stationarity: no trend detected: {figures}"
        if undo_rate > HIGH_UNDO_RATE:
            message += (f". WARNING: {undo_rate:.0%} of the steps were undone: the chain bounces at "
                        f"this S and dt (lower --dt, a colder --scale, or give --prior-scale)")
    return StationarityVerdict(stationary=stationary, n_chains=len(heldout), n_points=n_points,
                               slope_per_1k_steps=slope, trend_z=float(z), drift_nats=drift,
                               noise_nats=noise, rhat=rhat, probe_ess=ess, undo_rate=undo_rate,
                               message=message)
