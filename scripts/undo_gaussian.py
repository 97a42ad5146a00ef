"""What the run's undo does to the stationary distribution: the Gaussian battery with the undo.

Setting: the noisy-gradient battery of tests/samplers/test_noisy_gradients.py (a D = 1000
standard Gaussian in y, gradient y - sigma*xi with fresh xi ~ N(0, I) every step, sigma = 1,
S = 1, dt = 1e-2, refresh rate 1, ray tracer), read as an LM run at loss tolerance T: the
weights are x = sqrt(2T) y, so the target exp(-S_T * loss) with S_T = D/(2T) is N(0, 2T I), and
the minibatch loss the run compares step to step is

    loss_t = T * |y_t - sigma*xi_t|^2 / D + eps_t,   eps_t ~ N(0, BATCH_SD^2)

(eps_t: how much harder one batch of text is than another, which moves the loss but not the
gradient; BATCH_SD = 0.2 nats, about the tiny GPT-2's). Every step does what
`SamplingRun._loop` does: if the loss rose by more than the threshold since the last kept
step (`rtllm.samplers.movement.is_jump`), the last update is undone and the velocity reversed,
else the state is backed up and the step taken. E|y|^2/D is exactly 1 under the target at
every T; its estimate minus 1 is the undo's bias. SE: 20 batch means after a burn-in of 2,000
steps (each batch ~900 steps, >> the integrated autocorrelation time of |y|^2/D, 70-160 steps).

    OMP_NUM_THREADS=1 python scripts/undo_gaussian.py [--steps 20000]
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

import rtllm
from rtllm.samplers import movement

D, DT, SIGMA, BATCH_SD, BURN_IN = 1000, 1e-2, 1.0, 0.2, 2_000


def batch_loss(y: torch.Tensor, xi: torch.Tensor, eps: float, tolerance: float) -> float:
    return tolerance * float((y - SIGMA * xi).square().sum()) / D + eps


def start_loss_sd(tolerance: float, seed: int) -> float:
    """The run's calibration: the sd of ten minibatch losses at the start (y ~ N(0, I))."""
    gen = torch.Generator().manual_seed(seed + 10_000)
    y = torch.randn(D, generator=gen)
    losses = [batch_loss(y, torch.randn(D, generator=gen), BATCH_SD * float(torch.randn(1, generator=gen)),
                         tolerance) for _ in range(10)]
    return float(np.std(losses, ddof=1))


def threshold_for(rule: str | float | None, tolerance: float, seed: int) -> float | None:
    if rule == "auto":
        return movement.undo_threshold(tolerance, start_loss_sd(tolerance, seed))
    return None if rule is None else float(rule)


@torch.no_grad()
def undo_chain(tolerance: float, rule: str | float | None, steps: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """|y|^2/D after every step, and the fraction of steps undone."""
    threshold = threshold_for(rule, tolerance, seed)
    gen = torch.Generator().manual_seed(seed)
    y = torch.nn.Parameter(torch.randn(D, generator=gen))
    opt = rtllm.RayTracer([y], dt=DT, scale_likelihood=1.0, refresh_rate=1.0, seed=seed)
    shard = opt.shards[0]
    y.grad = torch.zeros(D)
    yd, xi = y.detach(), torch.empty(D)
    backup, prev, undone = None, None, 0
    sq = np.empty(steps)
    for t in range(steps):
        xi.normal_(generator=gen)
        eps = BATCH_SD * float(torch.randn(1, generator=gen))
        loss = batch_loss(yd, xi, eps, tolerance)
        if backup is not None and movement.is_jump(prev, loss, threshold):
            shard.set_position(backup[0])  # as SamplingRun._undo_last_step
            shard.v.copy_(backup[1]).neg_()
            undone += 1
        else:
            backup = (shard.position(copy=True), shard.v.clone())
            y.grad.copy_(yd).add_(xi, alpha=-SIGMA)
            opt.step()
            prev = loss
        sq[t] = float(torch.dot(yd, yd)) / D
    return sq, undone / steps


def bias_and_se(values: np.ndarray) -> tuple[float, float]:
    kept = values[BURN_IN:]
    means = np.array([b.mean() for b in np.array_split(kept, 20)])
    return float(kept.mean() - 1.0), float(means.std(ddof=1) / math.sqrt(len(means)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--tolerances", type=float, nargs="+", default=[0.05, 8.0])
    args = p.parse_args()
    print("| tolerance T | undo threshold | nats | steps undone | E|y|^2/D - 1 (= bias) | SE | bias / SE |")
    print("|---|---|---|---|---|---|---|")
    for tol in args.tolerances:
        for rule in (None, "auto", 1.0, 0.25):
            values, rate = undo_chain(tol, rule, args.steps)
            bias, se = bias_and_se(values)
            nats = threshold_for(rule, tol, 0)
            name = {None: "off", "auto": "auto (default)"}.get(rule, f"fixed {rule}")
            print(f"| {tol:g} | {name} | {'n/a' if nats is None else format(nats, '.3g')} | {rate:.2%} | "
                  f"{bias:+.4f} | {se:.4f} | {bias / se:+.1f} |")


if __name__ == "__main__":
    main()
