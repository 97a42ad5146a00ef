"""Does the ensemble's epistemic uncertainty flag text the model has never seen? (issue 17)

    OMP_NUM_THREADS=1 python scripts/bench_uncertainty.py --work /tmp/bench_unc [--sizes S M]

CPU, minutes per size. For every model size and tokenizer setting:

- "own": a tiny GPT-2 and its BPE tokenizer pretrained on two plays (Hamlet, Othello), sampled
  on Hamlet (a start near the mode of the sampling text);
- "elsewhere": model and tokenizer pretrained on two other plays (Lear, Richard III), sampled
  on Hamlet (a start that is not converged on the sampling text);

the pipelines below are run on the same gradient budget (~200 gradients, batch 8 x 64 tokens),
then evaluated on Julius Caesar (in-distribution, held out everywhere) against four
out-of-distribution texts: Python standard-library source, the GPL-3 text, Apache-2.0 + BSD +
Artistic license texts, and the Python reference manual's prose (pydoc_data/topics.py).

pipelines: start (the starting checkpoint alone: NLL only), default (`rtllm sample` defaults as
the issue ran them: 200 steps, burn-in 50, thin 15), tokens / tempered (--scale), multistart
(4 starts fine-tuned by AdamW for 25 steps, 30 ray-tracing steps each), deepens (the same 4
AdamW fine-tunes at 50 steps each, no sampling: a deep ensemble of the same budget), auto
(400 steps with --burn-in auto: twice the budget, to see what a stationary chain gives).
Reports epistemic and total-entropy AUROC (window level, OOD vs ID), BMA NLL, ECE and the
stationarity verdict of the chains. Results: JSON lines in WORK/results.jsonl and a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sysconfig
import time
from pathlib import Path

SHAKESPEARE = Path("/work/shared/data/shakespeare")
LICENSES = Path("/usr/share/common-licenses")
SIZES = {"S": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1024),
         "M": dict(n_layer=4, n_embd=128, n_head=4, vocab_size=2048)}
SETTINGS = {"own": ("hamlet.txt", "othello.txt"), "elsewhere": ("lear.txt", "richard_iii.txt")}
SAMPLING_TEXT, HELDOUT_TEXT, ID_TEXT = "hamlet.txt", "romeo_and_juliet.txt", "julius_caesar.txt"
TEXT_BYTES = 40_000  # per evaluation text: ~10k tokens, enough windows for a window-level AUROC
PIPELINES = ("start", "default", "tokens", "tempered", "multistart", "deepens", "auto")


def _snippet(work: Path, name: str, text: str) -> str:
    path = work / "texts" / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text[:TEXT_BYTES], encoding="utf-8")
    return str(path)


def texts(work: Path) -> tuple[str, dict[str, str]]:
    """The in-distribution evaluation text and the OOD texts by name (files under WORK/texts)."""
    from rtllm.lm.corpus import python_source_files

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    python = "".join(p.read_text(encoding="utf-8", errors="replace") for p in python_source_files(TEXT_BYTES))
    licenses = "".join((LICENSES / n).read_text(errors="replace") for n in ("Apache-2.0", "BSD", "Artistic"))
    topics = (stdlib / "pydoc_data" / "topics.py").read_text(encoding="utf-8", errors="replace")
    ood = {"python": _snippet(work, "python", python),
           "gpl3": _snippet(work, "gpl3", (LICENSES / "GPL-3").read_text(errors="replace")),
           "licenses": _snippet(work, "licenses", licenses),
           "pydoc": _snippet(work, "pydoc", topics[len(topics) // 3:])}
    return _snippet(work, "id", (SHAKESPEARE / ID_TEXT).read_text(encoding="utf-8")), ood


def pretrained(work: Path, size: str, setting: str) -> Path:
    from rtllm.lm.pretrain import ensure_pretrained

    return ensure_pretrained(work / f"model-{size}-{setting}", texts=[SHAKESPEARE / n for n in SETTINGS[setting]],
                             steps=300, seq_len=64, log=None, **SIZES[size])


def base_config(model: Path, out: Path, **kw):
    from rtllm.run.config import SampleConfig

    base = dict(model=str(model), train=(str(SHAKESPEARE / SAMPLING_TEXT),),
                heldout=(str(SHAKESPEARE / HELDOUT_TEXT),), out=str(out), steps=200, burn_in=50,
                thin=15, batch_size=8, seq_len=64, log_every=10, seed=0)
    base.update(kw)
    return SampleConfig(**base)


def run_pipeline(name: str, model: Path, out: Path) -> Path | None:
    from rtllm.run.config import MemberTraining
    from rtllm.run.mile import MileConfig, run_mile
    from rtllm.run.sampling import sample

    quiet = lambda _m: None  # noqa: E731
    if (out / "ensemble.json").is_file():
        return out
    if name == "start":
        return None
    if name in ("default", "tokens", "tempered"):
        scale = "tolerance" if name == "default" else name
        sample(base_config(model, out, scale=scale), overwrite=True, log=quiet)
        return out
    if name == "auto":
        sample(base_config(model, out, steps=400, burn_in="auto"), overwrite=True, log=quiet)
        return out
    if name == "multistart":
        cfg = base_config(model, out, steps=30, burn_in=10, thin=5)
        training = MemberTraining(lr=1e-3, max_steps=25, eval_every=25, patience=1)
    else:  # deep ensemble: the members themselves, each exported by a 2-step chain that does not move
        cfg = base_config(model, out, steps=2, burn_in=1, thin=1, dt=1e-12)
        training = MemberTraining(lr=1e-3, max_steps=50, eval_every=50, patience=1)
    run_mile(MileConfig(members=4, sampling=dataclasses.replace(cfg, sampler="ray"), training=training),
             overwrite=True, log=quiet)
    return out


def evaluate_pipeline(ens: Path | None, model: Path, id_text: str, ood: dict[str, str]) -> dict:
    from rtllm.evaluation.diagnostics import stationarity
    from rtllm.evaluation.streaming import evaluate

    row: dict = {}
    if ens is None:  # the start alone: its NLL (the same on every pair)
        any_ood = next(iter(ood.values()))
        from rtllm.run.sampling import sample

        tmp = model.parent / (model.name + "-as-ensemble")
        if not (tmp / "ensemble.json").is_file():  # one sample at the start (dt ~ 0): evaluate needs an ensemble
            sample(base_config(model, tmp, steps=2, burn_in=1, thin=1, dt=1e-12), overwrite=True, log=lambda _m: None)
        s = evaluate(tmp, [id_text], ood_texts=[any_ood], seq_len=64, mask=None).summary
        return {"nll_bma": s["nll_bma"], "ece_top1": s["ece_top1"], "pairs": {}}
    verdict = stationarity(ens).to_json()
    row["stationary"], row["trend_z"], row["drift_nats"] = verdict["stationary"], verdict["trend_z"], verdict["drift_nats"]
    row["pairs"] = {}
    for name, path in ood.items():
        s = evaluate(ens, [id_text], ood_texts=[path], baseline=str(model), seq_len=64, mask=None).summary
        row["pairs"][name] = {k: s.get(k) for k in ("auroc_ood_epistemic", "auroc_ood_total",
                                                     "mean_epistemic", "mean_epistemic_ood")}
        row.update({k: s[k] for k in ("nll_bma", "nll_baseline", "ece_top1", "n_samples_used")})
    return row


def table(rows: list[dict]) -> str:
    pairs = sorted({p for r in rows for p in r.get("pairs", {})})
    head = ("| size | tokenizer | pipeline | " + " | ".join(f"epi / tot AUROC {p}" for p in pairs) +
            " | BMA NLL | start NLL | ECE | samples | stationary (trend z) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = []
        for p in pairs:
            v = r.get("pairs", {}).get(p)
            cells.append("n/a" if v is None else f"{v['auroc_ood_epistemic']:.2f} / {v['auroc_ood_total']:.2f}")
        tz = r.get("trend_z")
        stat = "n/a" if "stationary" not in r else f"{r['stationary']} ({tz:+.1f})" if tz is not None else str(r["stationary"])
        lines.append(f"| {r['size']} | {r['setting']} | {r['pipeline']} | " + " | ".join(cells) +
                     f" | {r['nll_bma']:.3f} | {r.get('nll_baseline', r['nll_bma']):.3f} | {r['ece_top1']:.3f} | "
                     f"{r.get('n_samples_used', 1)} | {stat} |")
    return "\n".join(lines)


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    args = p.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    id_text, ood = texts(args.work)
    results = args.work / "results.jsonl"
    rows = []
    for size in args.sizes:
        for setting in args.settings:
            model = pretrained(args.work, size, setting)
            for name in args.pipelines:
                t0 = time.perf_counter()
                ens = run_pipeline(name, model, args.work / f"ens-{size}-{setting}-{name}")
                row = {"size": size, "setting": setting, "pipeline": name,
                       **evaluate_pipeline(ens, model, id_text, ood), "seconds": time.perf_counter() - t0}
                rows.append(row)
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
