"""pSMILE vs SMILE on an anisotropic Gaussian with gradient noise (docs/benchmarks.md, issue 12).

N(0, diag(sig^2)) in `--dim` dimensions, half sig = 1 (wide), half sig = 0.1 (stiff), seen
through the minibatch loss 0.5 sum(((x - c sig xi) / sig)^2), xi ~ N(0, I) fresh per full step
(both gradients of a step and its energy on one xi), scale_likelihood 1, chains from exact
draws, no tuning (the controller adapts eps from `--eps0`). Per chain and half: the bias of
mean (x_i / sig_i)^2 and Sokal's tau of that mean (in full steps), over the second half.

    .venv/bin/python scripts/bench_psmile.py [--grads 4000] [--chains 2] [--dim 100] [--c 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import rtllm
from rtllm.samplers.autocorr import integrated_autocorr_time


def chain(precondition: bool, seed: int, grads: int, dim: int, c: float, eps0: float) -> dict:
    gen = torch.Generator().manual_seed(1000 + seed)
    sig = torch.ones(dim)
    sig[dim // 2:] = 0.1
    x = torch.nn.Parameter(torch.randn(dim, generator=gen) * sig)
    opt = rtllm.SMILE([x], step_size=eps0, scale_likelihood=1.0, seed=seed, precondition=precondition)
    xd, xi = x.detach(), torch.zeros(dim)

    def loss() -> float:
        return 0.5 * float(((xd - c * sig * xi) / sig).pow(2).sum())

    draws = []
    for _ in range(grads):
        end = None
        if opt.phase == "start":
            end = loss()
            xi.normal_(generator=gen)
        x.grad.copy_((xd - c * sig * xi) / sig**2)
        opt.step(loss=loss(), end_loss=end)
        if opt.phase == "start":
            draws.append((xd / sig).pow(2).numpy().copy())
    v = np.array(draws[len(draws) // 2:])
    out = {"eps": opt.step_size, "rejections": opt.rejections}
    for name, half in (("wide", slice(0, dim // 2)), ("stiff", slice(dim // 2, dim))):
        series = v[:, half].mean(1)
        out[name] = (float(series.mean() - 1), float(integrated_autocorr_time(series)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grads", type=int, default=4000)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--dim", type=int, default=100)
    ap.add_argument("--c", type=float, default=3.0)
    ap.add_argument("--eps0", type=float, default=0.3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print("| sampler | chain | bias wide | tau wide | bias stiff | tau stiff | final eps | rejections |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for precondition in (False, True):
        for seed in range(args.chains):
            r = chain(precondition, seed, args.grads, args.dim, args.c, args.eps0)
            print(f"| {'psmile' if precondition else 'smile'} | {seed} | {r['wide'][0]:+.1%} | {r['wide'][1]:.1f} | "
                  f"{r['stiff'][0]:+.1%} | {r['stiff'][1]:.1f} | {r['eps']:.3g} | {r['rejections']} |", flush=True)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
