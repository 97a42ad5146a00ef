"""Series read back from a chain's run log (`runlog.py`): what the stationarity verdict judges.

A resumed run appends to its log and re-logs the steps after its checkpoint; for every step
the last record wins (it is the one the saved samples continue from).
"""
from __future__ import annotations

import numpy as np

Records = list[dict]


def _last_by_step(records: Records, kind: str) -> dict[int, dict]:
    by_step: dict[int, dict] = {}
    for rec in records:
        if rec.get("type") == kind:
            by_step[int(rec["step"])] = rec
    return by_step


def probe_trace(log_records: Records) -> tuple[np.ndarray, np.ndarray]:
    """The probe records of one chain's log: steps [n] (sorted, unique) and values [n, P*5]."""
    by_step = {s: r["probs"] for s, r in _last_by_step(log_records, "probe").items()}
    if not by_step:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0))
    steps = np.array(sorted(by_step), dtype=np.int64)
    rows = [np.asarray(by_step[s], dtype=np.float64).reshape(-1) for s in steps]  # "nan" -> nan
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"probe records disagree on their number of probabilities: {sorted(widths)}")
    return steps, np.stack(rows)


def sampling_steps(log_records: Records) -> list[dict]:
    """The step records of the sampling phase (after the burn-in), one per step, in order."""
    steps = _last_by_step(log_records, "step")
    return [steps[s] for s in sorted(steps) if steps[s].get("phase") == "sampling"]


def heldout_series(log_records: Records) -> tuple[np.ndarray, np.ndarray]:
    """Steps and held-out loss of the sampling phase: every sample step and logged step."""
    recs = [r for r in sampling_steps(log_records) if "heldout_loss" in r]
    return (np.array([int(r["step"]) for r in recs], dtype=np.int64),
            np.array([float(r["heldout_loss"]) for r in recs], dtype=np.float64))


def undo_counts(log_records: Records) -> tuple[int, int]:
    """(undone steps, all steps) of the sampling phase: the undo rate's two counts."""
    recs = sampling_steps(log_records)
    return sum(1 for r in recs if r.get("rejected") == "undone"), len(recs)


def burn_in_step(log_records: Records) -> int:
    """The first step logged in the "sampling" phase (0 when the log records no phases)."""
    recs = sampling_steps(log_records)
    return int(recs[0]["step"]) if recs else 0


def stationarity_inputs(chains: list[Records]) -> dict:
    """The keyword arguments of `rtllm.samplers.stationarity.stationarity_verdict` for these
    chains' logs: held-out series, post-burn-in probe traces and the undo counts."""
    heldout, probes, undone, total = [], [], 0, 0
    for records in chains:
        heldout.append(heldout_series(records))
        steps, values = probe_trace(records)
        if len(steps):
            probes.append(values[steps >= burn_in_step(records)])
        u, n = undo_counts(records)
        undone, total = undone + u, total + n
    return {"heldout": heldout, "probes": probes, "undone_steps": undone, "sampling_steps": total}
