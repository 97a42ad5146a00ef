"""rtllm evaluate with each sample's layers offloaded (accelerate dispatch) against the in-memory path.

    python scripts/bench_offload.py ENSEMBLE_DIR [--fraction 0.25] [--chars 20000] [--repeats 2]

Evaluates the ensemble on the first --chars characters of the bundled The Tempest (128-token
windows) with `rtllm.evaluate` as usual, then with `offload={"cpu": fraction x one sample's
bytes}` (on the CPU the rest of each sample goes to disk, in a temporary directory), alternately
--repeats times; prints the best time of each, their ratio, where accelerate put the modules,
and the largest difference of the per-token metrics. One JSON line at the end.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from rtllm.evaluation import offload, streaming
from rtllm.lm.corpus import __file__ as corpus_init
from rtllm.store.ensemble import Ensemble


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ensemble")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--chars", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()

    ens = Ensemble(args.ensemble)
    sample_bytes = sum(t.numel() * 4 for t in ens.state_dict(ens.entries[0]["index"]).values())
    budget = {"cpu": int(args.fraction * sample_bytes)}
    work = Path(tempfile.mkdtemp(prefix="bench-offload-"))
    text = work / "tempest.txt"
    text.write_text((Path(corpus_init).parent / "tempest.txt").read_text()[: args.chars])
    placements = []
    dispatch = offload.dispatch_offloaded

    def spy(model, max_memory, offload_dir=None):
        model = dispatch(model, max_memory, offload_dir)
        placements.append(sorted(set(model.hf_device_map.values())))
        return model

    offload.dispatch_offloaded = spy
    times: dict[str, list[float]] = {"in memory": [], "offloaded": []}
    results = {}
    for _ in range(args.repeats):
        for name, kw in (("in memory", {}), ("offloaded", {"offload": budget, "offload_dir": work / "off"})):
            t0 = time.perf_counter()
            results[name] = streaming.evaluate(args.ensemble, [text], seq_len=args.seq_len, device="cpu", **kw)
            times[name].append(time.perf_counter() - t0)
    a, b = results["in memory"], results["offloaded"]
    diff = max(float(abs(a.table[k] - b.table[k]).max()) for k in ("nll_bma", "epistemic", "aleatoric"))
    best = {k: min(v) for k, v in times.items()}
    row = {"samples": len(a.samples), "sample_bytes": sample_bytes, "budget_bytes": budget["cpu"],
           "tokens": int(len(a.table["nll_bma"])), "placement": placements[0],
           "best_s": best, "ratio": best["offloaded"] / best["in memory"], "max_metric_diff": diff,
           "nll_bma": [a.summary["nll_bma"], b.summary["nll_bma"]], "threads": torch.get_num_threads()}
    print(f"{row['samples']} samples of {sample_bytes / 1e6:.2f} MB, {row['tokens']} tokens; budget "
          f"{budget['cpu'] / 1e6:.2f} MB/sample, modules on {placements[0]}")
    print(f"in memory {best['in memory']:.2f} s, offloaded {best['offloaded']:.2f} s: "
          f"{row['ratio']:.2f}x; largest per-token metric difference {diff:.2e}")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
