"""Is this ensemble an ensemble? The sampling run's movement check, applied to what it left
behind (its log and manifest), so `rtllm evaluate` refuses a chain of copies.

The decision is `rtllm.samplers.movement.judge`, the function the run itself calls while it
samples (rtllm/run/movement_watch.py); here its inputs are rebuilt from the log: the sampling
steps after the burn-in (or after --dt auto last shrank dt) and how many were undone or
flagged, the `sample_movement` records (how far the probed weights moved between samples,
one step's expected move) and the samples' held-out losses. Logs written before these records
existed are judged on the rejected steps and the held-out losses alone.
"""
from __future__ import annotations

import re
from pathlib import Path

from rtllm.evaluation.diagnostics import find_logs
from rtllm.samplers import movement
from rtllm.store.manifest import Manifest
from rtllm.store.runlog import read_log


def chain_movement(records: list[dict], entries: list[dict]) -> movement.Movement:
    """The judge's inputs for one chain, from its log records and its manifest entries."""
    steps: dict[int, dict] = {}
    moves: dict[int, dict] = {}
    counted_from = None
    for rec in records:  # a resumed run re-logs the steps after its checkpoint: the last one wins
        kind = rec.get("type")
        if kind == "step":
            steps[int(rec["step"])] = rec
        elif kind == "sample_movement":
            moves[int(rec["index"])] = rec
        elif kind == "dt_shrink":
            counted_from = int(rec["step"]) + 1
    sampling = [t for t, r in steps.items() if r.get("phase") == "sampling"]
    start = min(sampling) if sampling else None
    if start is not None and counted_from is not None:
        start = max(start, counted_from)
    counted = [r for t, r in steps.items() if start is not None and t >= start]
    ordered = [moves[i] for i in sorted(moves)]
    heldout = [r["heldout_loss"] for r in ordered] if ordered else [e["heldout_loss"] for e in entries]
    return movement.Movement(
        sampling_steps=len(counted), rejected_steps=sum("rejected" in r for r in counted),
        sample_moves=tuple(float(r["move"]) for r in ordered if "move" in r),
        step_move=float(ordered[-1]["step_move"]) if ordered else None,
        heldout_losses=tuple(h for h in heldout if isinstance(h, (int, float))))


def check_ensemble(ensemble_dir: Path | str) -> list[tuple[int, movement.Verdict]]:
    """(chain id, verdict) for every chain of an output directory."""
    entries = Manifest.load(Path(ensemble_dir)).entries
    try:
        logs = find_logs(ensemble_dir)
    except FileNotFoundError:  # samples without a log: the held-out losses are all there is
        chains = sorted({e["chain"] for e in entries})
        return [(c, movement.judge(chain_movement([], [e for e in entries if e["chain"] == c])))
                for c in chains]
    verdicts = []
    for i, path in enumerate(logs):
        match = re.search(r"log-chain-(\d+)", path.name)
        chain = int(match.group(1)) if match else i
        mine = [e for e in entries if e["chain"] == chain]
        verdicts.append((chain, movement.judge(chain_movement(read_log(path), mine))))
    return verdicts


def refuse_degenerate(ensemble_dir: Path | str) -> None:
    """ValueError (one line, with the way out) when a chain of the ensemble did not move."""
    for chain, verdict in check_ensemble(ensemble_dir):
        if not verdict.moving:
            raise ValueError(f"{ensemble_dir} is no ensemble: chain {chain} did not move ({verdict.reason}); "
                             f"sample again with a smaller --dt or --dt auto, or pass --allow-degenerate "
                             f"to evaluate it anyway")
