"""Benchmark: one sampler step, forward/backward excluded (gradients pre-filled).

    python scripts/bench_update.py                      # CPU: 1e5..1e8 parameters, 10 tensors each
    python scripts/bench_update.py --sizes 2e7 --repeat 9
    python scripts/bench_update.py --json out/bench_update.json

Times rtllm.RayTracer.step() (steady steps, refresh on) against the paper's reference
raytrace_torch.Raytracer.step() on the same parameters in the same run, and splits our step into
its reduce pass, scalar rule and update pass. On a CUDA GPU it also reports the achieved GB/s of
the two Triton kernels against a device-to-device copy of the same bytes. Prints markdown.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import rtllm
from rtllm.kernels.philox import STREAM_REFRESH


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeat: int, device: torch.device, warmup: int = 2) -> float:
    """Median seconds of `repeat` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


DT = 1e-5


def make_params(numel: int, tensors: int, device: torch.device, dtype: torch.dtype):
    """Weights ~0.02, gradients scaled so one kick turns v by ~0.01 rad (k ~ 0.01 at S = D)."""
    gen = torch.Generator().manual_seed(0)
    sizes = [numel // tensors + (i < numel % tensors) for i in range(tensors)]
    params = [torch.nn.Parameter(0.02 * torch.randn(n, generator=gen).to(device, dtype)) for n in sizes]
    grad_std = 0.01 / (DT * numel)
    for p in params:
        p.grad = (grad_std * torch.randn(p.shape, generator=gen)).to(device, dtype)
    return params


def bench_ours(numel, tensors, device, dtype, repeat):
    params = make_params(numel, tensors, device, dtype)
    opt = rtllm.RayTracer(params, dt=DT, seed=0)
    opt.step()  # leave the first step behind: time steady steps
    step = timed(opt.step, repeat, device)
    # Split the step into its passes (same calls the step makes).
    shards, backend = opt.shards, opt.backend
    key = dict(seed=0, step=opt.steps_taken, stream=STREAM_REFRESH, noise=True)
    reduce = timed(lambda: [backend.reduce(s, **key) for s in shards], repeat, device)
    update = timed(lambda: [backend.update(s, 1.0, -1e-9, 1e-9, 0.0, **key) for s in shards],
                   repeat, device)
    return dict(step=step, reduce=reduce, update=update, backend=backend.name)


def bench_paper(numel, tensors, device, dtype, repeat):
    from raytrace_torch import Raytracer

    params = make_params(numel, tensors, device, dtype)
    opt = Raytracer(params, dt=DT)
    opt.step()
    t = timed(opt.step, repeat, device)
    del opt, params
    return t


def bench_kernels(numel: int, repeat: int, device: str | torch.device = "cuda") -> dict:
    """Achieved GB/s of the Triton kernels vs a device copy (CUDA; on CPU only under
    TRITON_INTERPRET=1, as a smoke test whose figures mean nothing)."""
    from rtllm.kernels.triton_step import fused_update_, reduce_sums

    dev = torch.device(device)
    x = torch.randn(numel, device=dev)
    v = torch.randn(numel, device=dev)
    g = torch.randn(numel, device=dev, dtype=torch.bfloat16)
    c = torch.empty(numel, device=dev, dtype=torch.bfloat16)
    key = dict(seed=1, step=3, stream=STREAM_REFRESH, offset=0, noise=True)
    t_red = timed(lambda: reduce_sums(v, g, **key), repeat, dev)
    t_upd = timed(lambda: fused_update_(x, v, g, c, alpha=1.0, beta=-1e-9, gamma=1e-9, delta=0.0, **key),
                  repeat, dev)
    src = torch.empty(numel * 13, dtype=torch.uint8, device=dev)  # 13 B: half of 26 B/param
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), repeat, dev)
    copy_gbs = 2 * src.numel() / t_copy / 1e9
    red_gbs = numel * 6 / t_red / 1e9  # reads fp32 v + bf16 g
    upd_gbs = numel * 20 / t_upd / 1e9  # reads x, v, g; writes x, v, bf16 compute
    floor = numel * 26 / (copy_gbs * 1e9)
    return dict(numel=numel, copy_GBps=copy_gbs, reduce_GBps=red_gbs, update_GBps=upd_gbs,
                reduce_frac_of_copy=red_gbs / copy_gbs, update_frac_of_copy=upd_gbs / copy_gbs,
                two_pass_ms=(t_red + t_upd) * 1e3, floor_ms=floor * 1e3,
                two_pass_over_floor=(t_red + t_upd) / floor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7, 2e7, 1e8])
    ap.add_argument("--tensors", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kernel-numel", type=float, default=1.56e9, help="CUDA kernel bandwidth size")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    machine = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# bench_update: {machine}, torch {torch.__version__}, commit {commit}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| params | tensors | ours step ms | reduce ms | update ms | rule+glue ms | paper ms | ours/paper |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for size in args.sizes:
        n = int(size)
        ours = bench_ours(n, args.tensors, device, dtype, args.repeat)
        paper = bench_paper(n, args.tensors, device, dtype, args.repeat)
        glue = ours["step"] - ours["reduce"] - ours["update"]
        rows.append(dict(numel=n, tensors=args.tensors, paper=paper, **ours))
        print(f"| {n:.0e} | {args.tensors} | {ours['step']*1e3:.2f} | {ours['reduce']*1e3:.2f} | "
              f"{ours['update']*1e3:.2f} | {glue*1e3:.2f} | {paper*1e3:.2f} | "
              f"{ours['step']/paper:.3f} |", flush=True)
    result = dict(machine=machine, commit=commit, torch=torch.__version__, rows=rows)
    if device.type == "cuda":
        k = bench_kernels(int(args.kernel_numel), args.repeat)
        result["kernels"] = k
        print("\n| elements | copy GB/s | reduce GB/s (% copy) | update GB/s (% copy) | "
              "two passes ms | 26 B/param floor ms | ratio |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {k['numel']:.3g} | {k['copy_GBps']:.0f} | {k['reduce_GBps']:.0f} "
              f"({100*k['reduce_frac_of_copy']:.0f}%) | {k['update_GBps']:.0f} "
              f"({100*k['update_frac_of_copy']:.0f}%) | {k['two_pass_ms']:.2f} | "
              f"{k['floor_ms']:.2f} | {k['two_pass_over_floor']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
