"""SMILE on the 1000-d Gaussian with gradient noise: the bias of E|x|^2 (docs/benchmarks.md, issue 12).

The setting of the "Gradient noise" table of scripts/bench_samplers.py: a D-dim standard
Gaussian seen through the minibatch loss 0.5|x - sigma xi|^2 (xi ~ N(0, I) fresh per minibatch;
full-batch target N(0, I)), scale_likelihood 1, `--grads` gradients per chain, chains from
exact draws. SMILE's two gradients of a full step share one xi and its energy is scored on it
(as `rtllm sample --sampler smile` does); no tuning budget: the controller adapts eps from
`--eps0` while it samples. Bias of E|x|^2 over the second half of each chain, mean over chains
± SE (between chains).

    .venv/bin/python scripts/bench_smile_noise.py [--grads 10000] [--chains 3] [--sigmas 0,1,3,10]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

import rtllm


@torch.no_grad()
def chain(sigma: float, seed: int, grads: int, dim: int, eps0: float) -> tuple[float, float, int]:
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.nn.Parameter(torch.randn(dim, generator=gen))
    opt = rtllm.SMILE([x], step_size=eps0, scale_likelihood=1.0, seed=seed)
    xd, xi = x.detach(), torch.zeros(dim)
    values = []
    for _ in range(grads):
        end = None
        if opt.phase == "start":
            end = 0.5 * float((xd - sigma * xi).pow(2).sum())
            xi.normal_(generator=gen)
        x.grad.copy_(xd).add_(xi, alpha=-sigma)
        opt.step(loss=0.5 * float((xd - sigma * xi).pow(2).sum()), end_loss=end)
        if opt.phase == "start":
            values.append(float(xd.pow(2).sum()) / dim)
    return float(np.mean(values[len(values) // 2:])) - 1, opt.step_size, opt.rejections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grads", type=int, default=10_000)
    ap.add_argument("--chains", type=int, default=3)
    ap.add_argument("--sigmas", default="0,1,3,10")
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--eps0", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    t0 = time.perf_counter()
    cells, notes = [], []
    for sigma in sigmas:
        runs = [chain(sigma, c, args.grads, args.dim, args.eps0) for c in range(args.chains)]
        bias = np.array([r[0] for r in runs])
        se = bias.std(ddof=1) / math.sqrt(len(bias)) if len(bias) > 1 else math.nan
        cells.append(f"{bias.mean():+.2%} ± {se:.2%}")
        notes.append(f"sigma {sigma:g}: final eps {', '.join(f'{r[1]:.3g}' for r in runs)}; rejections "
                     f"{', '.join(str(r[2]) for r in runs)} of {args.grads // 2} full steps")
        print(notes[-1], flush=True)
    print("\n| target | sampler | " + " | ".join(f"sigma {s:g}" for s in sigmas) + " |")
    print("|---|---|" + "---|" * len(sigmas))
    print("| Gaussian | smile | " + " | ".join(cells) + " |")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
