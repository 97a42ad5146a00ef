"""Within-chain and between-chain epistemic uncertainty of a multi-chain (multi-start) ensemble.

With samples weighted w_s, chains c of weight W_c = sum of their samples' weights, and p-bar
the ensemble's mean prediction, p-bar_c chain c's, the mutual information splits exactly:

    MI = H(p-bar) - sum_s w_s H(p_s)
       = [H(p-bar) - sum_c W_c H(p-bar_c)]  +  sum_c W_c [H(p-bar_c) - sum_{s in c} (w_s / W_c) H(p_s)]
       =            between chains          +            within chains (weighted mean of each chain's MI)

Both terms are >= 0 (concavity of H). Between-chain uncertainty is what different starts
disagree on; within-chain is what one chain's local posterior spreads over. Each chain is
evaluated on the same windows as the whole ensemble, so the token tables align.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from rtllm.evaluation.metrics import auroc, window_means
from rtllm.store.manifest import Manifest


def chain_dirs(ensemble_dir: Path | str) -> dict[int, Path]:
    """The chain directories of a merged multi-chain ensemble with samples ({} otherwise)."""
    d = Path(ensemble_dir)
    try:
        chains = Manifest.load(d).config.get("chains") or []
    except ValueError:
        return {}
    return {int(c["chain"]): d / c["dir"] for c in chains if c.get("n_samples") and (d / c["dir"]).is_dir()}


def _separation(table: dict, values: np.ndarray) -> dict:
    ind, ood = ~table["is_ood"], table["is_ood"]
    out = {"mean": float(values[ind].mean())}
    if ood.any():
        out["mean_ood"] = float(values[ood].mean())
        out["auroc_ood"] = auroc(window_means(values[ind], table["window"][ind])[1],
                                 window_means(values[ood], table["window"][ood])[1])
    return out


def split_by_chain(total, per_chain: dict[int, object]) -> dict:
    """The decomposition from the whole ensemble's EvalResult and each chain's (same windows)."""
    weights: dict[int, float] = {}
    for e in total.samples:
        weights[int(e["chain"])] = weights.get(int(e["chain"]), 0.0) + float(e["weight"])
    norm = sum(weights[c] for c in per_chain)
    table = total.table
    mean_chain_entropy = sum(weights[c] / norm * r.table["entropy_total"] for c, r in per_chain.items())
    within = sum(weights[c] / norm * r.table["epistemic"] for c, r in per_chain.items())
    between = np.clip(table["entropy_total"] - mean_chain_entropy, 0.0, None)
    out = {"n_chains": len(per_chain)}
    for name, values in (("between", between), ("within", within)):
        out.update({f"{k.replace('mean', f'mean_{name}').replace('auroc_ood', f'auroc_ood_{name}')}": v
                    for k, v in _separation(table, values).items()})
    out["per_chain"] = [{"chain": c, "weight": weights[c] / norm,
                         **{k: r.summary.get(k) for k in ("nll_bma", "mean_epistemic", "mean_epistemic_ood",
                                                          "auroc_ood_epistemic")}}
                        for c, r in sorted(per_chain.items())]
    return out


def evaluate_by_chain(ensemble_dir: Path | str, total, evaluate_dir: Callable[[Path], object]) -> dict | None:
    """Within/between-chain uncertainty, or None for an ensemble of fewer than two chains.
    evaluate_dir(chain_dir) evaluates one chain with the settings `total` was made with."""
    dirs = chain_dirs(ensemble_dir)
    used = {int(e["chain"]) for e in total.samples if "chain" in e}
    dirs = {c: p for c, p in dirs.items() if c in used}
    if len(dirs) < 2 or len(used) != len(dirs):
        return None
    per_chain = {c: evaluate_dir(p) for c, p in dirs.items()}
    for c, r in per_chain.items():
        if len(r.table["window"]) != len(total.table["window"]):
            raise ValueError(f"chain {c} was evaluated on other windows than the ensemble: evaluate "
                             f"with an explicit --seq-len")
    return split_by_chain(total, per_chain)
