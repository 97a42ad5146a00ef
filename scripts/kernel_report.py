"""Compile the step kernels for GPU targets (no GPU needed) and print what the code says.

Per kernel variant and target: registers per thread, spill bytes, widest global load/store in
32-bit words (4 = ld/st.global.v4), ld/st.global instruction counts in the PTX, static SASS
instructions and SASS instructions per element. With --before FILE (the --json output of an
earlier commit) prints the figures side by side.

    python scripts/kernel_report.py [--arch 90 ...] [--json] [--before before.jsonl]

Needs the CUDA backend of triton (its bundled ptxas and cuobjdump); TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

COLUMNS = ("registers", "spill_bytes", "load_width", "store_width", "global_loads", "global_stores",
           "sass_instructions", "instructions_per_element")
SHORT = ("regs", "spill", "ldw", "stw", "ld", "st", "sass", "instr/elem")


def _figures(archs: list[int] | None) -> list[dict]:
    cmd = [sys.executable, "-m", "rtllm.kernels.compile_check", "--json"]
    for arch in archs or []:
        cmd += ["--arch", str(arch)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "compile_check failed")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the raw rows (for --before later)")
    parser.add_argument("--before", help="JSON lines of an earlier run, shown as before -> after")
    args = parser.parse_args()
    rows = _figures(args.arch)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    before = {}
    if args.before:
        with open(args.before) as f:
            before = {(r["arch"], r["variant"]): r for r in map(json.loads, f) if r}
    print(f"{'sm':>3} {'variant':42} " + " ".join(f"{s:>12}" for s in SHORT))
    for row in rows:
        old = before.get((row["arch"], row["variant"]))
        cells = [f"{old[c]}->{row[c]}" if old else str(row[c]) for c in COLUMNS]
        print(f"{row['arch']:>3} {row['variant'][:42]:42} " + " ".join(f"{c:>12}" for c in cells))


if __name__ == "__main__":
    main()
