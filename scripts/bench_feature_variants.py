"""Issue 17: variants of `rtllm evaluate`'s feature-distance score, on the benchmark's settings.

    OMP_NUM_THREADS=2 python scripts/bench_feature_variants.py --work /tmp/bench_unc [--sizes S M]

Uses the start models and texts of scripts/bench_uncertainty.py (same WORK directory; a model is
pretrained there if missing) and the reference of `rtllm evaluate` (the sampling text, at most
256 windows). Per (size, setting) it prints the window-level AUROC of each OOD text against
Julius Caesar for: the shipped score (diagonal Mahalanobis of a window's mean final hidden state,
rtllm.evaluation.feature_distance), a full covariance shrunk toward its diagonal, and the
diagonal score over every block's output concatenated. A markdown table on stdout.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_uncertainty as bu  # noqa: E402

from rtllm.evaluation import feature_distance as fd  # noqa: E402
from rtllm.evaluation.metrics import auroc  # noqa: E402

SHRINKS = (0.1, 0.3, 0.6)


def block_features(model, windows: torch.Tensor) -> torch.Tensor:
    """[blocks + 1, W, hidden]: per window the mean of the embeddings' and every block's output
    (the last one after ln_f, as the shipped score reads it)."""
    parts = []
    with torch.inference_mode():
        for start in range(0, len(windows), 64):
            out = model.base_model(input_ids=windows[start:start + 64, :-1], output_hidden_states=True,
                                   use_cache=False)
            parts.append(torch.stack([fd.window_mean(h) for h in out.hidden_states]))
    return torch.cat(parts, 1)


def shrunk_distances(reference: torch.Tensor, x: torch.Tensor, shrink: float):
    """Mahalanobis with the covariance (1 - shrink) C + shrink diag(C), divided by the dimension."""
    mean = reference.mean(0)
    centred = reference - mean
    cov = centred.T @ centred / (len(reference) - 1)
    diag = torch.diag(torch.diag(cov))
    cov = (1 - shrink) * cov + shrink * diag + 1e-9 * diag.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    z = x - mean
    return ((z @ torch.linalg.inv(cov)) * z).sum(1).numpy() / len(cov)


def variants(work: Path, size: str, setting: str, text_paths) -> dict[str, list[float]]:
    scorer = bu.Scorer(bu.pretrained(work, size, setting), text_paths)
    ref = fd.reference_windows(scorer.tokenizer, [bu.SHAKESPEARE / bu.SAMPLING_TEXT], bu.SEQ_LEN)
    feats = block_features(scorer.model, torch.cat([ref, scorer.windows]))
    n, labels = len(ref), scorer.labels

    def aurocs(dist) -> list[float]:
        return [auroc(dist[labels == "id"], dist[labels == k]) for k in scorer.ood_names]

    last, blocks = feats[-1], torch.cat(list(feats[1:]), 1)
    rows = {"diagonal, final hidden state (shipped)": aurocs(fd.distances(last[n:], *fd.fit(last[:n])))}
    for s in SHRINKS:
        rows[f"full covariance shrunk {s}, final"] = aurocs(shrunk_distances(last[:n], last[n:], s))
    rows["diagonal, every block's output"] = aurocs(fd.distances(blocks[n:], *fd.fit(blocks[:n])))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--sizes", nargs="+", default=list(bu.SIZES), choices=list(bu.SIZES))
    ap.add_argument("--settings", nargs="+", default=list(bu.SETTINGS), choices=list(bu.SETTINGS))
    args = ap.parse_args(argv)
    text_paths = bu.texts(args.work)
    names = [n for n in text_paths if n != "id"]
    print(f"| size | setting | variant | {' | '.join(names)} | min |")
    print("|---|---|---|" + "---:|" * (len(names) + 1))
    for size in args.sizes:
        for setting in args.settings:
            for variant, values in variants(args.work, size, setting, text_paths).items():
                cells = " | ".join(f"{v:.3f}" for v in values)
                print(f"| {size} | {setting} | {variant} | {cells} | {min(values):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
