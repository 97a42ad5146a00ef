"""The dt-auto trial's snapshot of the sampler state: a host copy (before) against the file in OUT
(now: sliced write, mapped read), on CPU. Prints the peak anonymous host memory (RssAnon) each
adds, sampled every millisecond, and its seconds.

    python scripts/bench_trial_snapshot.py [--mparams 12] [--repeats 2]
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch

from rtllm import RayTracer
from rtllm.run.checkpoint import load_checkpoint, map_tensors, save_checkpoint


def _anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def _peak(fn) -> tuple[int, float]:
    base, peak, done = _anon(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _anon())
            time.sleep(0.001)

    thread = threading.Thread(target=watch)
    thread.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    return max(0, peak[0] - base), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mparams", type=float, default=12.0, help="millions of parameters")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    params = [torch.nn.Parameter(torch.randn(int(args.mparams * 1e6) // 8)) for _ in range(8)]
    sampler = RayTracer(params, dt=1e-3)
    folder = Path(tempfile.mkdtemp())

    def host_copy() -> None:  # SamplingRun._trial before
        sampler.load_state_dict(map_tensors(sampler.state_dict(), lambda t: t.to("cpu", copy=True)))

    def on_disk() -> None:  # SamplingRun._trial now
        path = folder / ".chain-000-dt-trial.tmp-0"
        save_checkpoint(path, sampler.state_dict(), durable=False)
        sampler.load_state_dict(load_checkpoint(path))
        path.unlink()

    n = sum(p.numel() for p in params)
    for _ in range(args.repeats):
        for name, fn in (("host copy", host_copy), ("disk", on_disk)):
            extra, seconds = _peak(fn)
            print(f"{name:>9}: {n:,} params (x + v = {8 * n / 2**20:.0f} MiB): peak RssAnon "
                  f"+{extra / 2**20:.1f} MiB, {seconds:.3f} s")


if __name__ == "__main__":
    main()
