"""Issue 17, part 1: what the epistemic AUROC depends on, swept on one setting.

    OMP_NUM_THREADS=1 python scripts/sweep_uncertainty.py --work /tmp/bench_unc [--size S --setting own]

Uses the models and texts of scripts/bench_uncertainty.py (same WORK directory; the model is
pretrained there if missing). Scored on Julius Caesar (ID) against GPL-3 and Python source (the
worst and a good pair of the benchmark), window-level AUROCs as there.

1. One long chain (`rtllm sample` defaults but 600 steps, burn-in 0, thin 5: 120 samples kept),
   then subsets of its samples: burn-in (0..450 at thin 15, 10 samples), chain length (span of
   the 10 kept samples, 50..550 steps after a burn-in of 50: thin = span / 10), number of samples
   at a fixed span (steps 200..600: 2..20 samples, i.e. thinning 200..20), other layouts of the
   default's 200-step budget (burn-in / thin), and the held-out loss over the whole chain.
2. Whole chains of 200 steps (burn-in 50, thin 15) with one option changed each: the loss
   tolerance (S = D / (2 tol): 0.01, 0.2, 1.0; 0.05 is the default), --scale tokens / tempered
   (from the benchmark's rows when present), --ray-per group / tensor, and seeds 1 and 2.
3. Why: per-token mutual information against the training-text frequency of the token the model
   reads (its input), in- and out-of-distribution (all five texts), for the default chain of
   part 2 (seed 0).
4. The start model's feature distance of every text from the sampling text, and its AUROC as
   an OOD detector (diagonal Mahalanobis of a window's mean last hidden state; all five texts).

Results: JSON lines in WORK/sweep-SIZE-SETTING.jsonl (rows there are reused), tables on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_uncertainty as B  # noqa: E402

LONG_STEPS, LONG_THIN = 600, 5


def long_chain(model: Path, out: Path):
    from rtllm.run.sampling import sample
    from rtllm.store.ensemble import Ensemble

    if not (out / "ensemble.json").is_file():
        sample(B.base_config(model, out, steps=LONG_STEPS, burn_in=0, thin=LONG_THIN), overwrite=True, log=B.QUIET)
    ens = Ensemble(out, verify=False)
    return {e["step"]: e["index"] for e in ens.entries if not e.get("masked")}, ens


def subsets() -> list[tuple[str, str, list[int]]]:
    """(sweep, value, steps of the kept samples) for part 1."""
    out = []
    for b in (0, 50, 150, 300, 450):
        out.append(("burn-in", str(b), [b + 15 * (j + 1) for j in range(10)]))
    for span in (50, 150, 300, 550):
        thin = span // 10
        out.append(("length", str(span), [50 + thin * (j + 1) for j in range(10)]))
    for n in (2, 5, 10, 20):
        thin = 400 // n
        out.append(("samples (steps 200-600)", str(n), [600 - thin * j for j in range(n)][::-1]))
    # The same 200-step budget as the default (burn-in 50, thin 15), laid out differently.
    for burn, thin, n in ((0, 20, 10), (20, 45, 4), (100, 10, 10), (0, 40, 5)):
        out.append(("200-step layout", f"burn-in {burn}, thin {thin}", [burn + thin * (j + 1) for j in range(n)]))
    return out


def nearest(steps_to_index: dict[int, int], wanted: list[int]) -> list[int]:
    have = np.array(sorted(steps_to_index))
    return [steps_to_index[int(have[np.abs(have - s).argmin()])] for s in wanted]


def chain_variants() -> dict[str, dict]:
    return {"tol 0.01": {"loss_tolerance": 0.01}, "tol 0.2": {"loss_tolerance": 0.2},
            "tol 1.0": {"loss_tolerance": 1.0}, "ray per group": {"ray_per": "group"},
            "ray per tensor": {"ray_per": "tensor"}, "seed 1": {"seed": 1}, "seed 2": {"seed": 2},
            "tol 0.05 (default)": {}, "tempered": {"scale": "tempered"}, "tokens": {"scale": "tokens"}}


def frequency_analysis(scorer: B.Scorer, states, train_text: Path) -> dict:
    """Mean MI per token by the training frequency of the input token, ID vs each OOD text."""
    import torch
    from rtllm.evaluation import metrics
    from rtllm.evaluation.streaming import load_weights
    from rtllm.lm.data import read_texts, tokenize_texts
    from rtllm.lm.model_io import load_tokenizer

    tok = load_tokenizer(scorer.model_dir, "pretrain it with scripts/bench_uncertainty.py")
    stream, _ = tokenize_texts(read_texts([train_text]), tok)
    counts = np.bincount(stream.numpy(), minlength=scorer.model.config.vocab_size)
    acc = metrics.PredictiveAccumulator(scorer.windows[:, 1:])
    with torch.inference_mode():
        for state in states:
            load_weights(scorer.model, state, Path("sample"), scorer.aliases)
            logits = scorer.model(input_ids=scorer.windows[:, :-1], use_cache=False).logits
            acc.add(logits.reshape(-1, logits.shape[-1]))
    scorer.model.load_state_dict(scorer.start)
    f = {k: v.numpy() for k, v in acc.finalize().items()}
    freq = counts[scorer.windows[:, :-1].reshape(-1).numpy()]  # how often the model read this input token
    label = np.repeat(scorer.labels, B.SEQ_LEN)
    bins = [(0, 1), (1, 10), (10, 100), (100, 1000), (1000, 10**9)]
    out: dict = {"bins": [f"{lo}-{hi if hi < 10**9 else 'inf'}" for lo, hi in bins], "texts": {}}
    for name in ["id"] + scorer.ood_names:
        m = label == name
        row = {"share": [], "mi": [], "total": []}
        for lo, hi in bins:
            k = m & (freq >= lo) & (freq < hi)
            row["share"].append(float(k.sum() / m.sum()))
            row["mi"].append(float(f["epistemic"][k].mean()) if k.any() else None)
            row["total"].append(float(f["entropy_total"][k].mean()) if k.any() else None)
        row["mi_mean"], row["total_mean"] = float(f["epistemic"][m].mean()), float(f["entropy_total"][m].mean())
        row["spearman_mi_logfreq"] = spearman(f["epistemic"][m], np.log1p(freq[m]))
        out["texts"][name] = row
    ind = label == "id"
    out["spearman_mi_total_id"] = spearman(f["epistemic"][ind], f["entropy_total"][ind])
    return out


def feature_distance(scorer: B.Scorer) -> dict:
    """How far each text sits from the sampling text in the start model's features, and the
    AUROC of that distance, OOD vs ID windows, per OOD text: `rtllm evaluate`'s feature score
    (rtllm.evaluation.feature_distance, through bench_uncertainty.Scorer.features; reference:
    at most 256 windows of the sampling text; session 4 used all of them and a 1e-8 floor)."""
    f = scorer.features()
    return {"mean_distance": f["mean_distance"], "auroc_feature_distance": f["auroc"],
            "n_reference_windows": f["n_reference_windows"]}


def spearman(a, b) -> float:
    from rtllm.evaluation.metrics import average_ranks

    ra, rb = average_ranks(a), average_ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def tables(rows: list[dict]) -> str:
    """Markdown tables of the sweep's rows (as in docs/uncertainty.md)."""
    lines = []
    scored = [r for r in rows if "pairs" in r]
    head = "| sweep | value | n | epi AUROC gpl3 / python | tot AUROC gpl3 / python | MI id / gpl3 / python | BMA NLL | ECE | extra |"
    lines += [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in scored:
        p = r["pairs"]
        extra = (f"stationary {r['stationary']} (z {r['trend_z']:+.1f}, drift {r['drift_nats']:+.3f}), {r['gradients']} grads"
                 if r.get("trend_z") is not None else f"steps {r['steps'][0]}..{r['steps'][-1]}" if "steps" in r else "")
        lines.append(f"| {r['sweep']} | {r['value']} | {r['n_samples']} | {p['gpl3']['auroc_epistemic']:.2f} / "
                     f"{p['python']['auroc_epistemic']:.2f} | {p['gpl3']['auroc_total']:.2f} / {p['python']['auroc_total']:.2f} | "
                     f"{r['mean_epistemic_id']:.4f} / {p['gpl3']['mean_epistemic']:.4f} / {p['python']['mean_epistemic']:.4f} | "
                     f"{r['nll_bma']:.3f} | {r['ece']:.3f} | {extra} |")
    for r in rows:
        if r["sweep"] == "long chain":
            h = np.array(r["heldout"])
            cuts = [0, 50, 100, 150, 200, 300, 400, 500, 600]
            means = [f"{a}-{b}: {h[(h[:, 0] >= a) & (h[:, 0] < b), 1].mean():.3f}" for a, b in zip(cuts, cuts[1:])
                     if ((h[:, 0] >= a) & (h[:, 0] < b)).any()]
            lines += ["", "held-out loss of the long chain, mean per step range: " + ", ".join(means)]
        if r["sweep"] == "frequency":
            lines += ["", "| text | " + " | ".join(f"input freq {b}: share / MI" for b in r["bins"]) +
                      " | MI mean | total mean | Spearman(MI, log freq) |", "|---" * (len(r["bins"]) + 4) + "|"]
            for name, t in r["texts"].items():
                cells = [f"{s:.2f} / {m:.4f}" if m is not None else f"{s:.2f} / -" for s, m in zip(t["share"], t["mi"])]
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {t['mi_mean']:.4f} | {t['total_mean']:.3f} | "
                             f"{t['spearman_mi_logfreq']:+.2f} |")
            lines.append(f"Spearman(MI, total entropy) over ID tokens: {r['spearman_mi_total_id']:+.2f}")
        if r["sweep"] == "features":
            lines += ["", "feature distance from the sampling text (mean; AUROC as OOD score): " + ", ".join(
                f"{n}: {r['mean_distance'][n]:.2f}" + (f" ({r['auroc_feature_distance'][n]:.2f})" if n != "id" else "")
                for n in r["mean_distance"])]
    return "\n".join(lines)


def main() -> None:
    import torch
    from rtllm.run.sampling import sample

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--size", default="S", choices=list(B.SIZES))
    p.add_argument("--setting", default="own", choices=list(B.SETTINGS))
    p.add_argument("--parts", nargs="+", default=["1", "2", "3", "4"], choices=["1", "2", "3", "4"])
    p.add_argument("--tables", action="store_true", help="only print the tables of the rows in WORK")
    args = p.parse_args()
    if args.tables:
        path = args.work / f"sweep-{args.size}-{args.setting}.jsonl"
        print(tables([json.loads(line) for line in path.read_text().splitlines()]))
        return
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    all_texts = B.texts(args.work)
    text_paths = {k: all_texts[k] for k in ("id", "gpl3", "python")}
    model = B.pretrained(args.work, args.size, args.setting)
    scorer = B.Scorer(model, text_paths)
    results = args.work / f"sweep-{args.size}-{args.setting}.jsonl"
    have = {(r["sweep"], r["value"]) for r in map(json.loads, results.read_text().splitlines())} \
        if results.is_file() else set()

    def record(sweep: str, value: str, row: dict) -> None:
        row = {"sweep": sweep, "value": value, **row}
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        short = {k: v for k, v in row.items() if k not in ("windows", "heldout")}
        print(json.dumps(short), flush=True)

    tag = f"{args.size}-{args.setting}"
    if "1" in args.parts:
        t0 = time.perf_counter()
        index_of, ens = long_chain(model, args.work / f"long-{tag}")
        if ("long chain", "heldout") not in have:
            record("long chain", "heldout", {"heldout": B.heldout_trend(args.work / f"long-{tag}"),
                                             "seconds_run": time.perf_counter() - t0})
        for sweep, value, steps in subsets():
            if (sweep, value) in have:
                continue
            idx = nearest(index_of, steps)
            row = scorer.score(ens.state_dict(i) for i in idx)
            record(sweep, value, {"steps": [ens.entry(i)["step"] for i in idx], **row})
    if "2" in args.parts:
        for name, change in chain_variants().items():
            if ("chain", name) in have:
                continue
            if name == "tol 0.05 (default)" or name in ("tempered", "tokens"):
                out = args.work / f"ens-{tag}-{'default' if name.startswith('tol') else name}"
            else:
                out = args.work / f"sweep-{tag}-{name.replace(' ', '_')}"
            t0 = time.perf_counter()
            if not (out / "ensemble.json").is_file():
                sample(B.base_config(model, out, **change), overwrite=True, log=B.QUIET)
            row = {**B.verdict_of(out), "gradients": B.chain_gradients(out),
                   **scorer.score(B.ensemble_states(out)), "seconds": time.perf_counter() - t0}
            record("chain", name, row)
    if "3" in args.parts and ("frequency", "default") not in have:
        out = args.work / f"ens-{tag}-default"
        if not (out / "ensemble.json").is_file():
            sample(B.base_config(model, out), overwrite=True, log=B.QUIET)
        record("frequency", "default", frequency_analysis(B.Scorer(model, all_texts), B.ensemble_states(out),
                                                          B.SHAKESPEARE / B.SAMPLING_TEXT))
    if "4" in args.parts and ("features", "start") not in have:
        record("features", "start", feature_distance(B.Scorer(model, all_texts)))


if __name__ == "__main__":
    main()
