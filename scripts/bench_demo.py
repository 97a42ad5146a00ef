"""Run `rtllm demo` from scratch and record its times and quality where people read them.

    python scripts/bench_demo.py [--out DIR] [--note "quiet machine"] [--write]
    python scripts/bench_demo.py --from-run rtllm-demo --wall 1234 --write   # a run already made

Runs the demo in a fresh directory (a subprocess, as a person would), reads the phase times it
wrote (demo_times.json) and its summary, and prints the markdown block of figures. With
--write it replaces the marked block in docs/benchmarks.md and the marked line in README.md, so
the README quotes what the benchmark measured last (tests/scripts/test_bench_demo.py checks that
the two agree).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench_demo:begin -->", "<!-- bench_demo:end -->"


def run_demo(out: Path) -> float:
    script = shutil.which("rtllm")
    cmd = [script] if script else [sys.executable, "-m", "rtllm.cli"]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "demo", "--out", str(out)], check=True)
    return time.perf_counter() - t0


def machine(note: str) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()}-core {platform.machine()} CPU, load average {load:.1f} at the end; {note}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def benchmark_block(times: dict, wall_s: float, where: str, rev: str, date: str,
                    how: str = "`python scripts/bench_demo.py` (`rtllm demo` from scratch)") -> str:
    s = times["summary"]
    return "\n".join([
        BEGIN,
        f"{how}, commit {rev}, {date}, {where}.",
        f"Wall time {wall_s:.0f} s: pretraining {times['pretrain']:.0f} s, sampling {times['sample']:.0f} s, "
        f"evaluation {times['evaluate']:.0f} s (the rest: start-up).",
        "",
        "| metric (The Tempest held out; stdlib Python as OOD) | value |",
        "|---|---:|",
        f"| NLL of the ensemble average (BMA), nats/token | {s['nll_bma']:.4f} |",
        f"| NLL of the starting checkpoint | {s['nll_baseline']:.4f} |",
        f"| mean NLL of single samples | {s['nll_samples_mean']:.4f} |",
        f"| BMA / start | {s['nll_bma'] / s['nll_baseline']:.3f} (quality target <= 1.02) |",
        f"| mean epistemic (MI), held-out vs OOD, nats | {s['mean_epistemic']:.4f} vs {s['mean_epistemic_ood']:.4f} |",
        f"| AUROC, OOD vs in-distribution windows by mean epistemic | {s['auroc_ood_epistemic']:.3f} (target > 0.6) |",
        END,
    ])


def readme_line(times: dict, wall_s: float) -> str:
    s = times["summary"]
    return (f"{BEGIN}The demo's ensemble on the held-out play: NLL of the ensemble average "
            f"{s['nll_bma']:.4f} nats/token vs {s['nll_baseline']:.4f} for the starting checkpoint; "
            f"epistemic uncertainty separates Python source from Shakespeare with AUROC "
            f"{s['auroc_ood_epistemic']:.3f}; the last measured demo took {wall_s / 60:.1f} min "
            f"(`scripts/bench_demo.py`; the machine and its load are in `docs/benchmarks.md`).{END}")


def replace_block(text: str, block: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {BEGIN} ... {END} block to replace")
    return pattern.sub(lambda _m: block, text, count=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="demo directory (default: a fresh temporary one, removed after)")
    ap.add_argument("--note", default="", help="what else ran on the machine")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md and README.md")
    ap.add_argument("--from-run", metavar="DIR", help="record a demo run that already finished in DIR "
                    "(its demo_times.json) instead of running one; give its --wall time")
    ap.add_argument("--wall", type=float, help="with --from-run: that run's wall seconds (default: the "
                    "sum of its phases)")
    args = ap.parse_args(argv)
    if args.from_run:
        times = json.loads((Path(args.from_run) / "demo_times.json").read_text())
        wall = args.wall or sum(times[k] for k in ("pretrain", "sample", "evaluate"))
    else:
        tmp = None if args.out else tempfile.mkdtemp(prefix="rtllm-bench-demo-")
        out = Path(args.out or tmp)
        try:
            wall = run_demo(out)
            times = json.loads((out / "demo_times.json").read_text())
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
    how = (f"`rtllm demo` from scratch, recorded with `python scripts/bench_demo.py --from-run {args.from_run}`"
           if args.from_run else "`python scripts/bench_demo.py` (`rtllm demo` from scratch)")
    block = benchmark_block(times, wall, machine(args.note), commit(), datetime.date.today().isoformat(), how)
    print(block)
    if args.write:
        for name, new in (("docs/benchmarks.md", block), ("README.md", readme_line(times, wall))):
            path = ROOT / name
            path.write_text(replace_block(path.read_text(), new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
