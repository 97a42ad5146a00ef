"""Convergence diagnostics in function space, from the sampling log (algorithms.md section 4).

Each chain's log (`log-chain-NNN.jsonl`) holds "probe" records: every `log_every` steps, the
probabilities the current weights give to the starting model's top-5 next tokens at P fixed
held-out positions. Each of those P*5 numbers is one statistic; its integrated
autocorrelation time (Sokal's windowed estimator) says how many steps apart two samples must
be to count as independent, and split R-hat across chains says whether the chains agree.

Units: the probe series is sampled once per logged interval, so tau is estimated in intervals
and converted to steps by multiplying by the interval. A step-level tau shorter than one
interval shows up as tau ~ 1 interval: the resolution is one interval.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from rtllm.samplers.autocorr import integrated_autocorr_time
from rtllm.samplers.stationarity import StationarityVerdict, stationarity_verdict
from rtllm.samplers.stationarity import split_rhat  # noqa: F401 (re-exported: it lived here)
from rtllm.store.log_series import burn_in_step as burn_in_from_log
from rtllm.store.log_series import probe_trace  # noqa: F401 (re-exported: it lived here)
from rtllm.store.log_series import stationarity_inputs
from rtllm.store.runlog import read_log

LOG_GLOB = "log-chain-*.jsonl"
# A statistic counts as converged when tau < n_points / MIN_LENGTH_OVER_TAU, i.e. at least 50
# effective draws per chain (the rule emcee's authors give for a trustworthy tau). A ratio of 5
# would test nothing: Sokal's window with c = 5 never returns tau above (n - 1) / 5.
MIN_LENGTH_OVER_TAU = 50.0
# ... and stationary when the split R-hat of the chain's own two halves is below this.
STATIONARY_RHAT = 1.1

Records = list[dict]
Source = Union[str, Path, Records, Sequence[Union[str, Path, Records]]]


# -- reading probes from the log -----------------------------------------------------------------
def _regular(steps: np.ndarray, values: np.ndarray, burn_in_step: int):
    """Post-burn-in probes on the logging grid, and the grid's interval in steps.

    The run also probes its very last step, which is usually off the grid; an autocorrelation
    estimate needs equally spaced points, so such points are dropped.
    """
    keep = steps >= burn_in_step
    steps, values = steps[keep], values[keep]
    if len(steps) < 2:
        return steps, values, 1
    diffs, counts = np.unique(np.diff(steps), return_counts=True)
    interval = int(diffs[np.argmax(counts)])
    on_grid = (steps - steps[0]) % interval == 0
    return steps[on_grid], values[on_grid], interval


def _as_chains(source: Source) -> list[Records]:
    if isinstance(source, (str, Path)):
        return [read_log(Path(source))]
    source = list(source)
    if source and all(isinstance(r, dict) for r in source):
        return [source]  # the records of one chain
    return [read_log(Path(s)) if isinstance(s, (str, Path)) else list(s) for s in source]


def _chain_traces(source: Source, burn_in_step: int | None):
    traces = []
    for records in _as_chains(source):
        steps, values = probe_trace(records)
        if len(steps) == 0:
            raise ValueError("the log holds no probe records")
        burn = burn_in_from_log(records) if burn_in_step is None else burn_in_step
        traces.append((*_regular(steps, values, burn), burn))
    return traces


def probe_autocorr(source: Source, burn_in_step: int | None = 0, c: float = 5.0,
                   min_length_over_tau: float = MIN_LENGTH_OVER_TAU) -> dict:
    """Integrated autocorrelation time of every probed probability, per chain.

    source: a log path, several paths, or one chain's (or several chains') parsed records.
    burn_in_step: probes at earlier steps are left out; None takes the burn-in from each log.
    Returns, as arrays [chains, P*5]: tau in logged intervals, tau_steps in steps,
    `converged` (tau < n_points / min_length_over_tau), `rhat_within` (split R-hat of each
    chain's two halves: a drift that tau alone can miss) and `stationary` (rhat_within <
    STATIONARY_RHAT); and summaries over the (chain, statistic) pairs with a defined tau (a
    probability that never moves has none; `n_constant` counts those).
    """
    taus, taus_steps, within, per_chain, lengths = [], [], [], [], []
    for steps, values, interval, burn in _chain_traces(source, burn_in_step):
        n = len(steps)
        tau = np.array([integrated_autocorr_time(values[:, j], c) for j in range(values.shape[1])])
        taus.append(tau)
        taus_steps.append(tau * interval)
        within.append(split_rhat([values]) if n >= 4 else np.full(values.shape[1], np.nan))
        lengths.append(n)
        per_chain.append({"burn_in_step": int(burn), "interval_steps": interval, "n_points": n,
                          "chain_length_steps": n * interval})
    widths = {len(t) for t in taus}
    if len(widths) != 1:
        raise ValueError(f"chains disagree on their number of probed probabilities: {sorted(widths)}")
    tau, tau_steps, rhat_within = np.stack(taus), np.stack(taus_steps), np.stack(within)
    conv = tau < np.array(lengths)[:, None] / min_length_over_tau
    # The rule of thumb, reported as asked; Sokal's window bounds tau by n/c, so with
    # c = 5 it passes for any series: `fraction_converged` is the strict criterion.
    conv_n5 = tau < np.array(lengths)[:, None] / 5.0
    stationary = rhat_within < STATIONARY_RHAT
    defined = np.isfinite(tau)

    def summary(fn, a):
        return float(fn(a[defined])) if defined.any() else math.nan

    return {
        "tau": tau, "tau_steps": tau_steps, "converged": conv,
        "rhat_within": rhat_within, "stationary": stationary,
        "tau_median": summary(np.median, tau), "tau_median_steps": summary(np.median, tau_steps),
        "tau_max_steps": summary(np.max, tau_steps),
        "fraction_converged": summary(np.mean, conv),
        "fraction_tau_below_n_over_5": summary(np.mean, conv_n5),
        "fraction_stationary": summary(np.mean, stationary),
        "rhat_within_max": float(np.nanmax(rhat_within)) if np.isfinite(rhat_within).any() else math.nan,
        "n_probes": tau.shape[1], "n_constant": int((~defined).sum()),
        "chain_length_steps": min(p["chain_length_steps"] for p in per_chain),
        "per_chain": per_chain,
    }


def probe_rhat(source: Source, burn_in_step: int | None = 0) -> np.ndarray:
    """Split R-hat of every probed probability across chains, on the steps all chains probed."""
    traces = _chain_traces(source, burn_in_step)
    common = traces[0][0]
    for steps, *_ in traces[1:]:
        common = np.intersect1d(common, steps)
    chains = [values[np.isin(steps, common)] for steps, values, *_ in traces]
    return split_rhat(chains)


# -- whole ensemble ---------------------------------------------------------------------------
def find_logs(ensemble_dir: Path | str) -> list[Path]:
    """The chains' logs of an output directory, sorted by chain number. In a merged multi-chain
    directory (rtllm.run.merge), the logs of the chains whose samples it lists."""
    d = Path(ensemble_dir)
    logs = sorted(d.glob(LOG_GLOB)) or _merged_chain_logs(d) or sorted(d.rglob(LOG_GLOB))
    if not logs:
        raise FileNotFoundError(f"no {LOG_GLOB} in {d}")
    return logs


def _merged_chain_logs(d: Path) -> list[Path]:
    from rtllm.store.manifest import Manifest

    try:
        chains = Manifest.load(d).config.get("chains") or []
    except ValueError:
        return []
    logs = [d / c["dir"] / f"log-chain-{c['chain']:03d}.jsonl" for c in chains if c.get("n_samples")]
    return [p for p in logs if p.is_file()]


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def diagnose(ensemble_dir: Path | str, burn_in_step: int | None = None, c: float = 5.0,
             min_length_over_tau: float = MIN_LENGTH_OVER_TAU) -> dict:
    """Convergence summary of an output directory's chains (plain Python values, JSON-ready).

    burn_in_step None takes each chain's burn-in from its log. tau_median is in logged
    intervals, *_steps in sampler steps. rhat_max/rhat_median (across chains) are None with
    one chain or where the chains share too few probed steps; rhat_within_max compares the
    halves of each chain and exists for one chain too.
    """
    logs = find_logs(ensemble_dir)
    records = [read_log(p) for p in logs]
    ac = probe_autocorr(records, burn_in_step, c, min_length_over_tau)
    rhat_max = rhat_median = frac_rhat = None
    if len(logs) > 1:
        try:
            rhat = probe_rhat(records, burn_in_step)
        except ValueError:
            rhat = np.full(1, np.nan)
        ok = np.isfinite(rhat)
        if ok.any():
            rhat_max, rhat_median = float(rhat[ok].max()), float(np.median(rhat[ok]))
            frac_rhat = float((rhat[ok] < 1.01).mean())
    steps = [r for recs in records for r in recs if r.get("type") == "step"]
    last_heldout = []
    for recs in records:
        held = [r["heldout_loss"] for r in recs if r.get("type") == "step" and "heldout_loss" in r]
        if held:
            last_heldout.append(_finite_or_none(float(held[-1])))  # a diverged step logs nan
    chain_ids = [int(m.group(1)) if (m := re.search(r"log-chain-(\d+)", p.name)) else i
                 for i, p in enumerate(logs)]
    return {
        "n_chains": len(logs), "chains": chain_ids, "logs": [str(p) for p in logs],
        "n_probes": ac["n_probes"], "n_constant_probes": ac["n_constant"],
        "burn_in_step": [p["burn_in_step"] for p in ac["per_chain"]],
        "interval_steps": [p["interval_steps"] for p in ac["per_chain"]],
        "chain_length_steps": ac["chain_length_steps"],
        "tau_median": _finite_or_none(ac["tau_median"]),
        "tau_median_steps": _finite_or_none(ac["tau_median_steps"]),
        "tau_max_steps": _finite_or_none(ac["tau_max_steps"]),
        "fraction_converged": _finite_or_none(ac["fraction_converged"]),
        "fraction_tau_below_n_over_5": _finite_or_none(ac["fraction_tau_below_n_over_5"]),
        "fraction_stationary": _finite_or_none(ac["fraction_stationary"]),
        "rhat_within_max": _finite_or_none(ac["rhat_within_max"]),
        "rhat_max": rhat_max, "rhat_median": rhat_median, "fraction_rhat_below_1.01": frac_rhat,
        "n_rejected_steps": sum(1 for r in steps if "rejected" in r),
        "heldout_loss_last": last_heldout,
    }


def stationarity(ensemble_dir: Path | str) -> StationarityVerdict:
    """The stationarity verdict (rtllm.samplers.stationarity) of an output directory's chains,
    from their logs: the same verdict `rtllm sample` prints at its end."""
    records = [read_log(p) for p in find_logs(ensemble_dir)]
    return stationarity_verdict(**stationarity_inputs(records))
