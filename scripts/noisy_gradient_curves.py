"""E|x|^2/D versus gradient-noise scale for ray tracing and HMC (for docs/benchmarks.md).

The setting of tests/test_noisy_gradients.py: the optimizer form on a D-dimensional standard
Gaussian with loss 0.5*|x - sigma*xi|^2, xi ~ N(0, I) drawn afresh every step from a seeded
torch.Generator (gradient x - sigma*xi; full-batch target N(0, I)), scale_likelihood 1, dt 1e-2,
refresh_rate 1, x0 a draw from N(0, I), one chain per (sampler, sigma). Ray tracing uses seed 0
and HMC seed 1 (as in the test). Prints a markdown table of E|x|^2/D +- SE and bias per sampler
and sigma; SE after the burn-in, the larger of the Sokal integrated-autocorrelation and the
20-batch-means estimates. Chains of one sampler share their seed across sigma (common random
numbers), so "Δbias paired", the mean of the difference of the |x|^2/D series at sigma and at
0, resolves the change of the bias with sigma much more finely than the biases themselves. The
last column is HMC's exact stationary value for this linear system (2x2 Lyapunov equation):
1 + 2.5e-5 + dt*sigma^2/2.

    .venv/bin/python scripts/noisy_gradient_curves.py [--steps 100000] [--sigmas 0,0.5,1,2,3,5]
"""
from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import rtllm
from rtllm.samplers.autocorr import integrated_autocorr_time as sokal_tau

# HMC's exact stationary value has one definition: the test's (tests/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "samplers"))
from test_noisy_gradients import hmc_theory  # noqa: E402

SAMPLERS = {"ray": (rtllm.RayTracer, 0), "hmc": (rtllm.HMC, 1)}  # class, seed


@torch.no_grad()
def run_chain(sampler: str, sigma: float, *, steps: int, dim: int, dt: float, rate: float,
              scale: float) -> np.ndarray:
    cls, seed = SAMPLERS[sampler]
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.Parameter(torch.randn(dim, generator=gen))
    opt = cls([x], dt=dt, scale_likelihood=scale, refresh_rate=rate, seed=seed)
    xd, xi = x.detach(), torch.empty(dim)
    sq = torch.empty(steps, dtype=torch.float64)
    for i in range(steps):
        xi.normal_(generator=gen)
        x.grad.copy_(xd).add_(xi, alpha=-sigma)  # gradient of 0.5*|x - sigma*xi|^2
        opt.step()
        sq[i] = torch.dot(xd, xd)
    if opt.skipped_steps:
        print(f"warning: {sampler} sigma={sigma}: {opt.skipped_steps} steps skipped",
              file=sys.stderr)
    return (sq / dim).numpy()


def integrated_autocorr_time(y: np.ndarray) -> float:
    """Sokal's estimate (rtllm.evaluation.diagnostics), at least 1."""
    return max(sokal_tau(y), 1.0)


def mean_se_tau(y: np.ndarray, batches: int = 20) -> tuple[float, float, float]:
    tau = integrated_autocorr_time(y)
    se_tau = math.sqrt(np.var(y) * tau / len(y))
    means = y[: len(y) // batches * batches].reshape(batches, -1).mean(axis=1)
    se_batch = float(np.std(means, ddof=1) / math.sqrt(batches))
    return float(np.mean(y)), max(se_tau, se_batch), tau


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100_000, help="steps per chain (burn-in included)")
    ap.add_argument("--burn-in", type=int, default=2_000)
    ap.add_argument("--sigmas", default="0,0.5,1,2,3,5")
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--dt", type=float, default=1e-2)
    ap.add_argument("--refresh-rate", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest at D=1000)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sigmas = [float(s) for s in args.sigmas.split(",")]

    print(f"`{shlex.join(['python'] + sys.argv)}`\n")
    print(f"D = {args.dim}, scale_likelihood = 1, dt = {args.dt}, refresh_rate = "
          f"{args.refresh_rate}, mom_norm = 1, {args.steps} steps per chain, burn-in "
          f"{args.burn_in}, x0 ~ N(0, I); seeds: ray tracing 0, HMC 1; torch {torch.__version__}, "
          f"{platform.machine()}, {torch.get_num_threads()} thread(s).\n")
    print("| sigma | RT E\\|x\\|²/D ± SE | RT bias (SE) | RT Δbias paired | RT tau "
          "| HMC E\\|x\\|²/D ± SE | HMC bias (SE) | HMC Δbias paired | HMC tau | HMC exact |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    at_zero = {}  # sampler -> its sigma = 0 chain, for the paired differences
    t_all = time.perf_counter()
    seconds = {"ray": 0.0, "hmc": 0.0}
    for sigma in sigmas:
        row = [f"{sigma:g}"]
        for sampler in ("ray", "hmc"):
            t0 = time.perf_counter()
            y = run_chain(sampler, sigma, steps=args.steps, dim=args.dim, dt=args.dt,
                          rate=args.refresh_rate, scale=1.0)[args.burn_in:]
            seconds[sampler] += time.perf_counter() - t0
            m, se, tau = mean_se_tau(y)
            if sigma == 0:
                at_zero[sampler] = y
            if sampler in at_zero:
                d, d_se, _ = mean_se_tau(y - at_zero[sampler]) if sigma else (0.0, 0.0, 0)
                paired = f"{d:+.3%} ± {d_se:.3%}"
            else:
                paired = "n/a"
            row += [f"{m:.4f} ± {se:.4f}", f"{m - 1:+.2%} ({(m - 1) / se:+.1f})", paired,
                    f"{tau:.0f}"]
        row.append(f"{hmc_theory(sigma, args.dt, args.refresh_rate):.4f}")
        print("| " + " | ".join(row) + " |", flush=True)
    n = len(sigmas) * args.steps
    print(f"\nwall time {time.perf_counter() - t_all:.0f} s (ray tracing "
          f"{seconds['ray'] / n * 1e3:.2f} ms/step, HMC {seconds['hmc'] / n * 1e3:.2f} ms/step, "
          f"chain loop included). Δbias paired: mean of |x|²/D at sigma minus at sigma = 0 "
          f"over the coupled chains (same seed: same x0, velocity, refresh noise and xi) ± its "
          f"SE. tau: integrated autocorrelation time of |x|²/D in steps.")


if __name__ == "__main__":
    main()
