"""`--dt auto`: the ray tracing paper's step-size recipe, automated.

From dt0 = 0.03 / sqrt(D), shrink dt 10x while a short trial diverges, then grow it 2x while
the trial stays stable, and keep the largest stable value. The trial itself (a few sampler
steps from a saved state, restored afterwards) is supplied by the sampling loop, which knows
the model and data; this module holds only the search, so it can be tested on its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Trial:
    dt: float
    start_loss: float
    end_loss: float
    stable: bool
    jumps: int = 0  # steps of the trial whose loss rose by more than the run's undo threshold


def initial_dt(num_params: int) -> float:
    """The paper's default: dt ~ 0.03 / sqrt(D)."""
    return 0.03 / math.sqrt(num_params)


def is_stable(start_loss: float, end_loss: float, tolerance: float, *, jumps: int = 0) -> bool:
    """A trial diverged if its loss is non-finite, more than 2x the tolerance above the start, or
    any of its steps would have been undone by the run (the guards share the posterior's units:
    docs/sampling.md, "Guards")."""
    return math.isfinite(end_loss) and math.isfinite(start_loss) and \
        end_loss - start_loss <= 2 * tolerance and jumps == 0


def describe(trial: Trial, tolerance: float) -> str:
    """The verdict with the loss rise in units of the tolerance, e.g. 'stable: +0.8 tolerance'."""
    rise = trial.end_loss - trial.start_loss
    shown = f"{rise / tolerance:+.2g}" if math.isfinite(rise) else "inf"
    text = f"{'stable' if trial.stable else 'diverged'}: {shown} x tolerance (limit +2)"
    return text + (f", {trial.jumps} step(s) over the undo threshold" if trial.jumps else "")


def search_dt(trial: Callable[[float], Trial], dt0: float, *, max_shrinks: int = 8,
              max_grows: int = 12) -> tuple[float, list[Trial]]:
    """Largest stable dt on the grid dt0 * 10^-i * 2^j; returns it and every trial run."""
    history = [trial(dt0)]
    dt = dt0
    while not history[-1].stable:
        if len(history) > max_shrinks:
            raise RuntimeError(
                f"--dt auto found no stable step down to dt = {dt:.3g}: the loss rises by more than "
                f"2x the tolerance within a trial even at tiny steps. Check that the model is "
                f"trained (sample from an optimized checkpoint) or raise --loss-tolerance")
        dt /= 10
        history.append(trial(dt))
    for _ in range(max_grows):
        attempt = trial(2 * dt)
        history.append(attempt)
        if not attempt.stable:
            break
        dt *= 2
    return dt, history
