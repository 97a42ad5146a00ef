"""Benchmark: MCLMC's step cost and the behaviour of its tuner on a Gaussian.

    python scripts/bench_mclmc.py                   # 2e7 parameters; 200-d Gaussian studies
    python scripts/bench_mclmc.py --numel 1e6 --repeat 5

1. One step() (forward/backward excluded, gradients pre-filled) of rtllm.MCLMC against
   rtllm.RayTracer on the same parameters: both are one reduce pass, float64 scalars and one
   update pass. MCLMC's start calls draw refresh noise like every ray-tracer step; its mid
   calls draw none, so they are cheaper.
2. Var[dE]/D against the step size on the 200-d Gaussian with scales 0.5..2 (16 chains x 400
   full steps, L = 18): where the energy error rises.
3. rtllm.tune_mclmc on that Gaussian, 16 chains each tuned alone (phases 600/200/300), for
   MILE's target 0.5 -> 0.1 and for 0.01 -> 0.002; then 1000 full steps at the tuned values:
   achieved Var[dE]/D, phase II's L against the truth sqrt(sum sigma^2), and per-coordinate
   variance accuracy. Prints markdown.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import rtllm
from rtllm.samplers.trajectory import MCLMCChains


def step_cost(numel: int, tensors: int, repeat: int) -> dict[str, float]:
    """Median seconds per step() for RayTracer and MCLMC on the same pre-filled gradients, the
    two timed alternately (the machine is shared: load changes within a run); for MCLMC also its
    start calls (which draw refresh noise) and mid calls (which do not) apart."""
    gen = torch.Generator().manual_seed(0)
    sizes = [numel // tensors + (i < numel % tensors) for i in range(tensors)]
    samplers = {}
    for name, build in (("RayTracer", lambda ps: rtllm.RayTracer(ps, dt=1e-5, seed=0)),
                        ("MCLMC", lambda ps: rtllm.MCLMC(ps, step_size=1e-3, L=1.0, seed=0))):
        params = [torch.nn.Parameter(0.02 * torch.randn(n, generator=gen)) for n in sizes]
        samplers[name] = build(params)
        for p in params:
            p.grad.copy_(torch.randn(p.shape, generator=gen) * 1e-3)
    times = {name: [] for name in samplers}
    for i in range(2 * repeat + 2):
        for name, opt in samplers.items():
            t0 = time.perf_counter()
            opt.step()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    out = {name: statistics.median(t) for name, t in times.items()}
    out["MCLMC start calls"] = statistics.median(times["MCLMC"][0::2])  # calls alternate start, mid
    out["MCLMC mid calls"] = statistics.median(times["MCLMC"][1::2])
    return out


def gaussian(dim: int = 200):
    sigma = torch.linspace(0.5, 2.0, dim, dtype=torch.float64)
    return sigma, (lambda x: -0.5 * ((x / sigma) ** 2).sum(-1))


def energy_curve(step_sizes: list[float]) -> list[tuple[float, float]]:
    sigma, log_prob = gaussian()
    x0 = torch.randn(16, len(sigma), dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigma
    rows = []
    for eps in step_sizes:
        run = MCLMCChains(log_prob, x0, step_size=eps, L=18.0, seed=1).run(400)
        rows.append((eps, float(np.nanmean(run.energy_change[50:] ** 2)) / len(sigma)))
    return rows


def tuned(target_var: tuple[float, float]) -> dict[str, float]:
    sigma, log_prob = gaussian()
    dim = len(sigma)
    x0 = torch.randn(16, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigma
    chains = MCLMCChains(log_prob, x0, step_size=2.0, L=14.0, seed=0)
    t0 = time.perf_counter()
    eps, L, info = rtllm.tune_mclmc(chains, phase1=600, phase2=200, phase3=300, target_var=target_var)
    seconds = time.perf_counter() - t0
    run = chains.run(1000)
    per_chain = np.nanmean(run.energy_change**2, axis=0) / dim
    ratio = run.samples[100:].reshape(-1, dim).var(0) / sigma**2
    return {"eps": float(eps.mean()), "eps_sd": float(eps.std()), "L2": float(info.L_phase2.mean()),
            "L_true": float(sigma.pow(2).sum().sqrt()), "L3": float(L.mean()),
            "var": float(per_chain.mean()), "var_lo": float(per_chain.min()),
            "var_hi": float(per_chain.max()),
            "ratio_bias": float(ratio.mean() - 1), "ratio_abs": float((ratio - 1).abs().mean()),
            "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=float, default=2e7)
    ap.add_argument("--tensors", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()

    cost = step_cost(int(args.numel), args.tensors, args.repeat)
    print(f"## MCLMC step vs RayTracer step, {args.numel:.0e} parameters in {args.tensors} tensors\n")
    print("| sampler | ms per step() |\n|---|---|")
    for name, sec in cost.items():
        print(f"| {name} | {sec * 1e3:.1f} |")

    torch.set_num_threads(1)  # small tensors: one thread is fastest
    print("\n## Var[dE]/D against the step size (200-d Gaussian, scales 0.5..2, L = 18)\n")
    print("| step size | Var[dE]/D |\n|---|---|")
    for eps, var in energy_curve([10, 14, 17, 18, 19, 20, 22]):
        print(f"| {eps:g} | {var:.3g} |")

    print("\n## tune_mclmc on that Gaussian (16 chains, phases 600/200/300, then 1000 steps)\n")
    print("| target Var[dE]/D | tuned eps (mean +- sd) | achieved Var[dE]/D (chains' range) | "
          "L phase II / truth | L phase III | var ratio bias | mean abs(ratio-1) | tuning s |")
    print("|---|---|---|---|---|---|---|---|")
    for target in ((0.5, 0.1), (0.01, 0.002)):
        r = tuned(target)
        print(f"| {target[0]} -> {target[1]} | {r['eps']:.2f} +- {r['eps_sd']:.2f} | {r['var']:.3g} "
              f"({r['var_lo']:.2g}..{r['var_hi']:.2g}) | {r['L2']:.2f} / {r['L_true']:.2f} | {r['L3']:.2f} | "
              f"{r['ratio_bias']:+.3f} | {r['ratio_abs']:.3f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
