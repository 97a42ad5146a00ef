"""Issue 19's done-when figures: does the chain move at every --loss-tolerance, or fail loudly?

Samples one model at several tolerances with everything else at the defaults the issue used
(240 steps, burn-in 60, thin 18, batch 8 x 64) and prints, per tolerance: the chosen dt, the
undo threshold, the fraction of sampling steps undone, the spread of the samples' held-out
losses, the median move of the probed weights between samples (in steps), or the one-line
error the run stopped with.

    OMP_NUM_THREADS=1 python scripts/bench_tolerance_movement.py --model DIR --train FILE --out DIR
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from rtllm.run.config import SampleConfig
from rtllm.run.movement_watch import ChainNotMoving
from rtllm.run.sampling import sample
from rtllm.store.runlog import read_log


def summarize(out: Path, error: str | None) -> dict:
    log = read_log(out / "log-chain-000.jsonl")
    guards = next(r for r in log if r["type"] == "guards")
    steps = {r["step"]: r for r in log if r["type"] == "step"}
    sampling = [r for r in steps.values() if r["phase"] == "sampling"]
    moves = [r for r in log if r["type"] == "sample_movement"]
    shrinks = [r for r in log if r["type"] == "dt_shrink"]
    held = [r["heldout_loss"] for r in moves]
    in_steps = sorted(r["move"] / r["step_move"] for r in moves if "move" in r)
    return {
        "dt": sampling[-1]["dt"] if sampling else None, "threshold": guards["reject_threshold"],
        "shrinks": len(shrinks), "undone": sum("rejected" in r for r in sampling), "sampling": len(sampling),
        "burn_in_undone": sum("rejected" in r for r in steps.values() if r["phase"] == "burn-in"),
        "samples": len(moves), "heldout_sd": statistics.stdev(held) if len(held) > 1 else None,
        "move_steps": in_steps[len(in_steps) // 2] if in_steps else None, "error": error,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tolerances", type=float, nargs="+", default=[0.05, 0.5, 2.0, 8.0])
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--burn-in", type=int, default=60)
    p.add_argument("--thin", type=int, default=18)
    p.add_argument("--dt", default="auto")
    p.add_argument("--reject-threshold", default="auto")
    args = p.parse_args()
    threshold = None if args.reject_threshold == "off" else \
        args.reject_threshold if args.reject_threshold == "auto" else float(args.reject_threshold)
    rows = []
    for tol in args.tolerances:
        out = Path(args.out) / f"tol-{tol:g}"
        cfg = SampleConfig(model=args.model, train=tuple(args.train), out=str(out), steps=args.steps,
                           burn_in=args.burn_in, thin=args.thin, batch_size=8, seq_len=64, loss_tolerance=tol,
                           dt=args.dt if args.dt == "auto" else float(args.dt), reject_threshold=threshold)
        error = None
        try:
            sample(cfg, overwrite=True, log=lambda m: print(f"[tol {tol:g}] {m}"))
        except (ChainNotMoving, RuntimeError, ValueError) as err:
            error = str(err)
        rows.append((tol, summarize(out, error)))
    print("| tolerance | dt | undo threshold (nats) | dt shrinks | undone (burn-in) | undone (sampling) "
          "| held-out loss sd of samples | median move between samples (steps) | outcome |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tol, r in rows:
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        outcome = "moves" if r["error"] is None else f"stopped: {r['error']}"
        print(f"| {tol:g} | {fmt(r['dt'], '.3g')} | {fmt(r['threshold'], '.3g')} | {r['shrinks']} | "
              f"{r['burn_in_undone']} | {r['undone']}/{r['sampling']} | {fmt(r['heldout_sd'], '.3g')} | "
              f"{fmt(r['move_steps'], '.3g')} | {outcome} |")


if __name__ == "__main__":
    main()
