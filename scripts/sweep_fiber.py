"""Sweep of the fiber walk's lr and drift on a tiny GPT-2 (the defaults of `rtllm fiber`).

One particle, `--steps` walk steps on minibatches of 8 x 64 tokens of the training plays (as in
scripts/bench_samplers_lm.py); every 5 steps the loss on 8 validation sequences is compared with
the start's; within 0.05 nats the iterate is kept, outside the walk pulls back (gradient steps
without drift, each checked). Per setting: kept iterates, pull-backs, the worst loss rise seen,
the distance |x - x0| of the last kept iterate, and how many of 8 draws of a rank-2 PCA map of
the kept offsets are inside the tolerance.

    .venv/bin/python scripts/sweep_fiber.py --model DIR [--grid 0.03:2,0.03:8,0.1:2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_samplers_lm import LMSettings, load_problem  # noqa: E402

from rtllm.lm.data import MinibatchOrder  # noqa: E402
from rtllm.lm.loss import lm_loss  # noqa: E402
from rtllm.run.fiber import flat_position, set_flat_position  # noqa: E402
from rtllm.samplers.fiber import FiberWalk  # noqa: E402
from rtllm.samplers.fiber_map import fit_pca_map  # noqa: E402

TOLERANCE, THIN = 0.05, 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--grid", default="0.03:2,0.03:8,0.03:32,0.1:0.5,0.1:2,0.1:8,0.3:2,0.3:8")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = load_problem(args.model, LMSettings(budget=300, samples=8, eval_windows=8))
    model, ev = p.model, p.data.heldout[:8]

    @torch.no_grad()
    def eval_loss() -> float:
        return float(lm_loss(model, ev[:, :-1], ev[:, 1:]))

    params = [q for q in model.parameters() if q.requires_grad]
    start_loss = eval_loss()
    print("| lr | drift | kept | pull-backs | worst loss rise | distance of last kept | generated inside | wall s |")
    print("|---:|---:|---|---:|---:|---:|---|---:|")
    for item in args.grid.split(","):
        lr, drift = (float(v) for v in item.split(":"))
        t0 = time.perf_counter()
        walk = FiberWalk(params, lr=lr, drift=drift, seed=0)
        start = flat_position(walk)
        order = MinibatchOrder(len(p.data.train), 8, 0)
        kept, worst, pulls, pulling = [], 0.0, 0, False
        for t in range(args.steps):
            seqs = p.data.train[order.batch(t)]
            walk.zero_grad()
            lm_loss(model, seqs[:, :-1], seqs[:, 1:]).backward()
            walk.step(drift=not pulling)
            if pulling or (t + 1) % THIN == 0:
                rise = eval_loss() - start_loss
                worst = max(worst, rise)
                pulls += rise > TOLERANCE and not pulling
                pulling = rise > TOLERANCE
                if not pulling and (t + 1) % THIN == 0:
                    kept.append(flat_position(walk) - start)
        inside = "-"
        if len(kept) >= 3:
            n_in = 0
            for offset in fit_pca_map(torch.stack(kept), 2).sample(8, torch.Generator().manual_seed(0)):
                set_flat_position(walk, start + offset)
                n_in += eval_loss() - start_loss <= TOLERANCE
            inside = f"{n_in}/8"
        set_flat_position(walk, start)
        dist = float(kept[-1].norm()) if kept else 0.0
        print(f"| {lr:g} | {drift:g} | {len(kept)}/{args.steps // THIN} | {pulls} | {worst:+.4f} | {dist:.3f} | "
              f"{inside} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
