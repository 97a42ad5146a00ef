"""Benchmark: one sampler step per state layout (rtllm.state.layouts), forward/backward excluded.

    python scripts/bench_layouts.py                       # CPU: 1e6 and 1e7 bf16 parameters
    python scripts/bench_layouts.py --sizes 2e7 --repeat 9

bf16 parameters in 10 tensors with pre-filled gradients (as scripts/bench_update.py), one
RayTracer per layout on the default backend (torch on CPU, Triton on CUDA). Reports the median
step and update pass (which is where the layouts differ: fp32-split joins and splits the
position's two planes instead of writing a compute copy), in alternating order so a drifting
machine hits every layout alike, and the bytes per parameter the state takes. Prints markdown.
"""
from __future__ import annotations

import argparse
import platform

import torch

import rtllm
from rtllm.kernels.philox import STREAM_REFRESH
from rtllm.state.layouts import LAYOUTS

from bench_update import make_params, timed  # run as a script: scripts/ is on sys.path


def bench(numel: int, layout: str, device: torch.device, repeat: int) -> dict:
    params = make_params(numel, 10, device, torch.bfloat16)
    opt = rtllm.RayTracer(params, dt=1e-5, seed=0, layout=layout)
    opt.step()  # time steady steps
    key = dict(seed=0, step=opt.steps_taken, stream=STREAM_REFRESH, noise=True)
    update = timed(lambda: [opt.backend.update(s, 1.0, -1e-9, 1e-9, 1e-9, **key) for s in opt.shards],
                   repeat, device)
    return dict(step=timed(opt.step, repeat, device), update=update, backend=opt.backend.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best median is kept")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"{where}, torch {torch.__version__}; bf16 parameters in 10 tensors, median of {args.repeat}, "
          f"best of {args.rounds} alternating rounds\n")
    print("| params | layout | B/param | backend | step ms | update ms |")
    print("|---:|---|---:|---|---:|---:|")
    for size in args.sizes:
        numel, best = int(size), {}
        for r in range(args.rounds):
            for layout in (list(LAYOUTS) if r % 2 == 0 else list(reversed(LAYOUTS))):
                got = bench(numel, layout, device, args.repeat)
                old = best.get(layout)
                best[layout] = got if old is None else {k: min(v, got[k]) if k != "backend" else v
                                                        for k, v in old.items()}
        for layout in LAYOUTS:
            b = best[layout]
            per = sum(LAYOUTS[layout].bytes_per_param(2).values())
            print(f"| {numel:.0e} | {layout} | {per} | {b['backend']} | {b['step'] * 1e3:.2f} | "
                  f"{b['update'] * 1e3:.2f} |")


if __name__ == "__main__":
    main()
