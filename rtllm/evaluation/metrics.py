"""Predictive-uncertainty math for an ensemble of weight samples (algorithms.md section 4).

Per token, with p_s the next-token distribution of sample s and normalized weights w_s:
the Bayesian model average p = sum_s w_s p_s; total = H[p]; aleatoric = sum_s w_s H[p_s];
epistemic = mutual information = total - aleatoric (>= 0 by concavity of H; the difference
of two rounded numbers can come out a few ulps below 0, which is clamped to 0).

`PredictiveAccumulator` gathers these over samples streamed one at a time, holding one
`[tokens, vocab]` fp32 running mean and a few fp64 numbers per token; the aggregates (ECE,
AUROC, summary) are plain numpy over the per-token results, the `TokenTable`.
"""
from __future__ import annotations

import csv
import json
import math
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

TokenTable = dict[str, np.ndarray]
"""Per-token results: equal-length arrays under exactly TOKEN_TABLE_KEYS. `window` numbers the
in-distribution windows first, then the OOD ones; `position` is the index of the predicted
token in its window's T + 1 tokens (1..T, the number of context tokens the model saw);
`nll_baseline` is NaN without a baseline. Floats are float64, `token` holds str objects."""
TOKEN_TABLE_KEYS = ("window", "position", "token_id", "token", "nll_bma", "p_observed",
                    "entropy_total", "aleatoric", "epistemic", "nll_samples_mean", "confidence",
                    "correct", "nll_baseline", "is_ood")
ECE_BINS = 15
# Rows of a [rows, vocab] fp64 block: 4 such temporaries (log p, p, products) stay within this.
_BLOCK_BYTES = 32 << 20


def block_rows_for(vocab: int, block_bytes: int = _BLOCK_BYTES) -> int:
    """Rows per fp64 reduction block so its ~4 `[rows, vocab]` temporaries fit `block_bytes`."""
    return max(1, block_bytes // (4 * 8 * vocab))


class PredictiveAccumulator:
    """Running per-token sums over samples for one chunk of N scored tokens.

    `add(logits, weight)` once per sample (logits `[N, V]`, any float dtype), or `add_block`
    per piece and `close_sample`; `finalize()` returns the per-token metrics. Log-softmax and
    entropies are elementwise fp32 with fp64 accumulation over the vocabulary (a third of the
    cost of fp64 throughout; entropy errors ~1e-7 nats, far below the epistemic values of
    interest); only the running mean of p is stored, in fp32. The BMA probability of the
    observed token is kept as a running fp64 log-sum-exp, so its NLL stays finite even when
    that probability is below fp32's range.
    """

    def __init__(self, targets: Tensor, *, block_bytes: int = _BLOCK_BYTES) -> None:
        self.targets = targets.reshape(-1).long()
        n, dev = self.targets.numel(), self.targets.device
        self.block_bytes = block_bytes
        self.mean_p: Tensor | None = None  # [N, V] fp32, allocated at the first add
        self.aleatoric = torch.zeros(n, dtype=torch.float64, device=dev)
        self.nll_samples = torch.zeros(n, dtype=torch.float64, device=dev)
        self.log_p_obs = torch.full((n,), -math.inf, dtype=torch.float64, device=dev)
        self.total_weight = 0.0

    @torch.no_grad()
    def add(self, logits: Tensor, weight: float = 1.0) -> None:
        """One sample's logits for all N tokens."""
        self.add_block(logits.reshape(self.targets.numel(), -1), weight, 0)
        self.close_sample(weight)

    @torch.no_grad()
    def add_block(self, logits: Tensor, weight: float, start: int) -> None:
        """One sample's logits `[n, V]` for tokens start..start+n (forward passes in pieces);
        call close_sample(weight) once the sample has covered all N tokens."""
        if not weight > 0:
            raise ValueError(f"sample weight must be > 0, got {weight!r}")
        if self.mean_p is None:
            self.mean_p = torch.zeros(self.targets.numel(), logits.shape[-1], dtype=torch.float32,
                                      device=logits.device)
        log_w = math.log(weight)
        step = block_rows_for(logits.shape[1], self.block_bytes)
        for r in range(0, logits.shape[0], step):
            local = slice(r, r + step)
            rows = slice(start + r, start + r + len(logits[local]))
            lp = torch.log_softmax(logits[local].float(), dim=-1)
            p = lp.exp()
            # -inf logits (a masked vocabulary entry) have p = 0: clamp so 0 * log 0 is 0.
            # fp32 elementwise, fp64 accumulation: a third of the fp64 cost, errors ~1e-7 nats.
            ent = -(p * lp.clamp_(min=torch.finfo(torch.float32).min)).sum(-1, dtype=torch.float64)
            lp_obs = lp.gather(1, self.targets[rows, None])[:, 0].double()
            self.aleatoric[rows] += weight * ent
            self.nll_samples[rows] -= weight * lp_obs
            self.log_p_obs[rows] = torch.logaddexp(self.log_p_obs[rows], lp_obs + log_w)
            self.mean_p[rows].add_(p, alpha=weight)

    def close_sample(self, weight: float) -> None:
        self.total_weight += weight

    @torch.no_grad()
    def finalize(self) -> dict[str, Tensor]:
        """Per-token fp64 tensors: nll_bma, p_observed, entropy_total, aleatoric, epistemic,
        nll_samples_mean, confidence, brier, and `correct` (bool). Divides by the total weight,
        so unnormalized weights give the weighted mean."""
        if self.mean_p is None:
            raise ValueError("no sample was added; nothing to average")
        total_w = self.total_weight
        n = self.targets.numel()
        entropy = torch.empty(n, dtype=torch.float64, device=self.targets.device)
        sum_p2, confidence = torch.empty_like(entropy), torch.empty_like(entropy)
        argmax = torch.empty(n, dtype=torch.long, device=self.targets.device)
        step = block_rows_for(self.mean_p.shape[1], self.block_bytes)
        for r in range(0, n, step):
            rows = slice(r, r + step)
            p = self.mean_p[rows].double() / total_w
            entropy[rows] = -torch.special.xlogy(p, p).sum(-1)
            sum_p2[rows] = (p * p).sum(-1)
            confidence[rows], argmax[rows] = p.max(-1)
        log_p_obs = self.log_p_obs - math.log(total_w)
        p_obs = log_p_obs.exp()
        aleatoric = self.aleatoric / total_w
        return {
            "nll_bma": -log_p_obs, "p_observed": p_obs, "entropy_total": entropy,
            "aleatoric": aleatoric,
            # rounding can leave total - aleatoric a few ulps below 0; MI itself is >= 0
            "epistemic": (entropy - aleatoric).clamp_min(0.0),
            "nll_samples_mean": self.nll_samples / total_w, "confidence": confidence,
            # sum_v (p_v - onehot_v)^2 = sum_v p_v^2 - 2 p_obs + 1
            "brier": sum_p2 - 2.0 * p_obs + 1.0, "correct": argmax == self.targets,
        }


@torch.no_grad()
def token_nll(logits: Tensor, targets: Tensor, *, block_bytes: int = _BLOCK_BYTES) -> Tensor:
    """-log p(target) per token, fp64, of logits `[N, V]` (e.g. the starting checkpoint)."""
    logits = logits.reshape(targets.numel(), -1)
    targets = targets.reshape(-1, 1).long()
    out = torch.empty(targets.shape[0], dtype=torch.float64, device=logits.device)
    step = block_rows_for(logits.shape[1], block_bytes)
    for r in range(0, logits.shape[0], step):
        lp = torch.log_softmax(logits[r:r + step].double(), dim=-1)
        out[r:r + step] = -lp.gather(1, targets[r:r + step])[:, 0]
    return out


# -- calibration ------------------------------------------------------------------------------
def reliability(confidence, correct, n_bins: int = ECE_BINS, *, equal_mass: bool = False
                ) -> dict[str, np.ndarray]:
    """Per-bin `count`, mean `confidence` and `accuracy` of top-1 predictions.

    Equal-width bins split [0, 1] into `n_bins` intervals (confidence 1 falls in the last);
    equal-mass bins split the tokens sorted by confidence into `n_bins` groups of sizes
    differing by at most one (ties at a boundary may land in either group). Empty bins have
    count 0 and NaN means.
    """
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    corr = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != corr.shape:
        raise ValueError(f"confidence ({conf.size}) and correct ({corr.size}) differ in length")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if equal_mass:
        bins = np.empty(conf.size, dtype=np.int64)
        for b, idx in enumerate(np.array_split(np.argsort(conf, kind="stable"), n_bins)):
            bins[idx] = b
    else:
        bins = np.clip(np.floor(conf * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(bins, weights=corr, minlength=n_bins) / count
    return {"count": count.astype(np.int64), "confidence": mean_conf, "accuracy": accuracy}


def ece(confidence, correct, n_bins: int = ECE_BINS, *, equal_mass: bool = False) -> float:
    """Expected calibration error of the top-1 prediction: sum_b (n_b / n) |acc_b - conf_b|."""
    rel = reliability(confidence, correct, n_bins, equal_mass=equal_mass)
    n = rel["count"].sum()
    if n == 0:
        raise ValueError("ECE of zero tokens is undefined")
    used = rel["count"] > 0
    gap = np.abs(rel["accuracy"][used] - rel["confidence"][used])
    return float((rel["count"][used] * gap).sum() / n)


# -- out-of-distribution detection ------------------------------------------------------------
def average_ranks(x) -> np.ndarray:
    """1-based ranks of `x`, tied values sharing the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64).ravel()
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def auroc(negatives, positives) -> float:
    """Area under the ROC curve of scores meant to be higher for `positives`:
    P(pos > neg) + P(pos == neg) / 2, by the Mann-Whitney rank-sum formula (O(n log n))."""
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    pos = np.asarray(positives, dtype=np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        raise ValueError(f"AUROC needs scores of both classes, got {neg.size} negatives and "
                         f"{pos.size} positives")
    if np.isnan(neg).any() or np.isnan(pos).any():
        raise ValueError("AUROC scores contain NaN")
    ranks = average_ranks(np.concatenate([neg, pos]))
    u = ranks[neg.size:].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def window_means(values, window) -> tuple[np.ndarray, np.ndarray]:
    """`(window ids, mean of values per window)`, ids sorted."""
    ids, inverse = np.unique(np.asarray(window), return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(values, dtype=np.float64))
    return ids, sums / np.bincount(inverse)


# -- aggregates -------------------------------------------------------------------------------
def summarize(table: dict[str, np.ndarray], brier: np.ndarray, *, has_baseline: bool) -> dict:
    """Summary over the in-distribution tokens (nats per token), plus OOD separation when the
    table holds OOD tokens: AUROC of telling OOD windows from in-distribution ones by their
    mean epistemic (resp. total) uncertainty."""
    ind = ~table["is_ood"]
    n = int(ind.sum())
    if n == 0:
        raise ValueError("no in-distribution tokens to summarize")
    mean = lambda key: float(table[key][ind].mean())  # noqa: E731
    nll = mean("nll_bma")
    out = {"nll_bma": nll}
    if has_baseline:
        out["nll_baseline"] = mean("nll_baseline")
    out.update({
        "nll_samples_mean": mean("nll_samples_mean"), "perplexity_bma": math.exp(nll),
        "accuracy_top1": mean("correct"),
        "ece_top1": ece(table["confidence"][ind], table["correct"][ind]),
        "ece_top1_equal_mass": ece(table["confidence"][ind], table["correct"][ind],
                                   equal_mass=True),
        "brier": float(np.asarray(brier)[ind].mean()), "mean_total": mean("entropy_total"),
        "mean_aleatoric": mean("aleatoric"), "mean_epistemic": mean("epistemic"), "n_tokens": n,
    })
    ood = table["is_ood"]
    if ood.any():
        out["n_tokens_ood"] = int(ood.sum())
        out["mean_epistemic_ood"] = float(table["epistemic"][ood].mean())
        out["mean_total_ood"] = float(table["entropy_total"][ood].mean())
        for key, column in (("auroc_ood_epistemic", "epistemic"),
                            ("auroc_ood_total", "entropy_total")):
            _, in_means = window_means(table[column][ind], table["window"][ind])
            _, ood_means = window_means(table[column][ood], table["window"][ood])
            out[key] = auroc(in_means, ood_means)
    return out


# -- the per-token table ---------------------------------------------------------------------
def write_token_table(table: TokenTable, path: str | Path) -> None:
    """Write the table as JSON lines (.jsonl; NaN and infinities as null, which JSON lacks) or
    CSV (.csv; NaN as an empty field, booleans as true/false), one row per token, columns in
    TOKEN_TABLE_KEYS order; written to a temporary file, then renamed into place."""
    path = Path(path)
    missing = [k for k in TOKEN_TABLE_KEYS if k not in table]
    if missing:
        raise ValueError(f"token table lacks columns {missing}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"token table path {path} must end in .jsonl or .csv")
    columns = [np.asarray(table[k]).tolist() for k in TOKEN_TABLE_KEYS]
    if len({len(c) for c in columns}) > 1:
        raise ValueError("token table columns differ in length")
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if suffix == ".jsonl":
                for row in zip(*columns):
                    values = [None if isinstance(v, float) and not math.isfinite(v) else v
                              for v in row]
                    f.write(json.dumps(dict(zip(TOKEN_TABLE_KEYS, values)), ensure_ascii=False))
                    f.write("\n")
            else:
                writer = csv.writer(f)
                writer.writerow(TOKEN_TABLE_KEYS)
                for row in zip(*columns):
                    writer.writerow([_csv_field(v) for v in row])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _csv_field(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if v != v else repr(v)
    return v
