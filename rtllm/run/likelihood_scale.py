"""The likelihood scale S in ln p(x) = -S * (mean token loss) + ln prior(x), chosen on purpose.

- "tolerance" (the paper's, the default): S = D / (2 * loss_tolerance). At equilibrium each of
  the D coordinates holds 1/2 nat, so the posterior sits ~loss_tolerance above the optimum.
  For a 0.5M-parameter model on one play (~60k tokens) that is ~100x the token count: a very
  cold posterior whose width is set by the tolerance, not by the data.
- "tokens": S = N, the number of training tokens: the Bayesian posterior of the summed NLL
  (with a prior, `--prior-scale`, it is the textbook posterior; without one it is improper
  when D > N, and the chain drifts: the run's stationarity verdict says so).
- "tempered": S = sqrt(N * D / (2 * loss_tolerance)), the geometric middle of the two.

`--scale-likelihood S` overrides all three. docs/uncertainty.md measures them.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rtllm.run.config import SampleConfig

SCALES = ("tolerance", "tokens", "tempered")


def likelihood_scale(scale: str, *, num_params: int, train_tokens: int, loss_tolerance: float) -> float:
    """S for the named choice (see the module docstring)."""
    if scale not in SCALES:
        raise ValueError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if num_params < 1 or train_tokens < 1 or not loss_tolerance > 0:
        raise ValueError(f"the likelihood scale needs D >= 1, N >= 1 and a tolerance > 0, got "
                         f"D={num_params}, N={train_tokens}, tolerance={loss_tolerance}")
    by_tolerance = num_params / (2 * loss_tolerance)
    if scale == "tolerance":
        return by_tolerance
    if scale == "tokens":
        return float(train_tokens)
    return math.sqrt(train_tokens * by_tolerance)


def run_likelihood_scale(cfg: "SampleConfig", num_params: int, *, train_tokens: int) -> float:
    """A run's S: --scale-likelihood when given, else the --scale choice."""
    if cfg.scale_likelihood is not None:
        return float(cfg.scale_likelihood)
    return likelihood_scale(cfg.scale, num_params=num_params, train_tokens=train_tokens,
                            loss_tolerance=cfg.tolerance)
