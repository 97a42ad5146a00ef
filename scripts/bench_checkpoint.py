"""Checkpoint write: the sliced safetensors writer against a whole-state torch.save, on CPU.

Each variant runs in a fresh process (peak RSS is per process). Prints seconds and the peak RSS
above the state itself.  Usage: python scripts/bench_checkpoint.py [--mparams 50] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(variant: str, mparams: int, repeats: int, out: Path) -> dict:
    import torch

    from rtllm.run.checkpoint import map_tensors, save_checkpoint

    n = mparams * 1_000_000
    state = {"sampler": {"position": [[torch.randn(n)]], "velocity": [[torch.randn(n)]]}, "state": {"step": 1}}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if variant == "sliced":
            save_checkpoint(out / "c.safetensors", state)
        else:  # what rtllm did before: every tensor copied to the host, then pickled
            with open(out / "c.pt", "wb") as f:
                torch.save(map_tensors(state, lambda t: t.detach().to("cpu", copy=True)), f)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "state_bytes": 8 * n, "seconds_min": min(times),
            "extra_peak_bytes": peak - base}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mparams", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(_child(args.child, args.mparams, args.repeats, Path(d))))
        return
    for variant in ("torch.save", "sliced"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--mparams", str(args.mparams),
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
