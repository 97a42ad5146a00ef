"""How long `rtllm --help` and `rtllm <command> --help` take, each in a fresh process.

    python scripts/bench_cli.py [--repeats 5] [--json bench_cli.json]

The parser imports nothing heavy (tests/test_architecture.py checks that no torch or
transformers is imported); this measures what a person waits for, interpreter start-up
included. Prints a markdown table (median and slowest of the repeats) for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time

TARGET_S = 2.0  # issue 16: every --help under 2 s on the 2-core development machine


def commands() -> list[list[str]]:
    from rtllm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [[]] + [[name] for name in sub.choices]


def rtllm_command() -> list[str]:
    """The installed `rtllm` script when there is one (what a person runs), else the module."""
    script = shutil.which("rtllm")
    return [script] if script else [sys.executable, "-m", "rtllm.cli"]


def time_help(args: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([*rtllm_command(), *args, "--help"], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs per command (default: 5)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    rows = []
    for cmd in commands():
        times = time_help(cmd, args.repeats)
        rows.append({"command": " ".join(["rtllm", *cmd, "--help"]), "median_s": statistics.median(times),
                     "max_s": max(times)})
    print(f"| command | median (s) | slowest of {args.repeats} (s) |\n|---|---|---|")
    for r in rows:
        print(f"| `{r['command']}` | {r['median_s']:.3f} | {r['max_s']:.3f} |")
    worst = max(r["max_s"] for r in rows)
    print(f"\nslowest: {worst:.3f} s ({'within' if worst < TARGET_S else 'over'} the {TARGET_S:.0f} s target)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"repeats": args.repeats, "rows": rows}, f, indent=2)
    return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
