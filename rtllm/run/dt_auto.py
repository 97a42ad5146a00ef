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


def initial_dt(num_params: int) -> float:
    """The paper's default: dt ~ 0.03 / sqrt(D)."""
    return 0.03 / math.sqrt(num_params)


def is_stable(start_loss: float, end_loss: float, tolerance: float) -> bool:
    """A trial diverged if its loss is non-finite or more than 2x the tolerance above the start."""
    return math.isfinite(end_loss) and math.isfinite(start_loss) and end_loss - start_loss <= 2 * tolerance


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
