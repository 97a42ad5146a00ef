"""`--burn-in auto`: burn in until the held-out loss has no significant trend, within a bound.

The run evaluates the held-out loss every `log_every` steps. After each evaluation of the
burn-in, the trend (rtllm.samplers.stationarity.loss_trend: least-squares slope against its
autocorrelation-aware standard error) is fitted to the most recent half of the burn-in's
evaluations. The burn-in ends when that window holds at least MIN_POINTS evaluations, its
trend is not significant (|z| < TREND_Z) and the change the fit puts over the window is
smaller than the loss's noise around it. It ends at the latest after MAX_FRACTION of the
steps, so at least half the run samples (docs/uncertainty.md, "--burn-in auto").
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from rtllm.samplers.stationarity import loss_trend

MAX_FRACTION = 0.5  # the burn-in never takes more than this share of --steps
MIN_POINTS = 6  # held-out evaluations in the window before a verdict (so >= 11 evaluated)
TREND_Z = 2.0  # looser than the end-of-run verdict's 3: stopping too early is the costly error


def max_burn_in(steps: int) -> int:
    """The bound of an automatic burn-in, in steps."""
    return max(1, int(steps * MAX_FRACTION))


def burn_in_done(points: list[list[float]], step: int, steps: int) -> bool:
    """Whether the burn-in may end after `step`. points: [step, held-out loss] of the burn-in."""
    if step + 1 >= max_burn_in(steps):
        return True
    recent = np.asarray(points[len(points) // 2:], dtype=np.float64)
    if len(recent) < MIN_POINTS:
        return False
    trend = loss_trend(recent[:, 0], recent[:, 1])
    return math.isfinite(trend.z) and abs(trend.z) < TREND_Z and abs(trend.drift) < trend.noise


def advance_auto_burn_in(state: dict, step: int, heldout: float | None, steps: int,
                         say: Callable[[str], None]) -> None:
    """The run's hook after each step of an undecided burn-in: state["burn_in_heldout"] gathers
    the held-out evaluations; state["burn_in"] is set to step + 1 when the burn-in ends."""
    if heldout is not None:
        state["burn_in_heldout"].append([step, heldout])
    elif step + 1 < max_burn_in(steps):
        return
    if burn_in_done(state["burn_in_heldout"], step, steps):
        state["burn_in"] = step + 1
        say(f"burn-in auto: ends after step {step + 1} ({len(state['burn_in_heldout'])} held-out "
            f"evaluations; bound {max_burn_in(steps)} steps)")
