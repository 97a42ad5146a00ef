"""Does the ensemble's epistemic uncertainty flag text the model has never seen? (issue 17, part 6)

    OMP_NUM_THREADS=1 python scripts/bench_uncertainty.py --work /tmp/bench_unc \
        [--sizes S M] [--settings own elsewhere] [--md docs-table.md]

CPU, minutes per size. Models (pretrained here, 300 AdamW steps of 8 x 64 tokens, cached in WORK):
size S = GPT-2 with 2 layers, n_embd 64, vocabulary 1024 (0.17M parameters); size M = 4 layers,
n_embd 128, vocabulary 2048 (1.05M). Tokenizer settings:

- "own": model and BPE tokenizer pretrained on Hamlet + Othello, sampled on Hamlet (the
  sampling text's own tokenizer, a start near its mode);
- "elsewhere": model and tokenizer pretrained on Lear + Richard III, sampled on Hamlet (a
  tokenizer trained elsewhere, a start not converged on the sampling text).

Every pipeline starts from that checkpoint, trains on Hamlet (held-out loss: Romeo and Juliet)
with ~240 gradients of 8 x 64 tokens (counted per row: dt trials and AdamW steps included):

  start       the checkpoint alone (NLL, ECE; no uncertainty of its own)
  default     `rtllm sample` defaults as the issue ran them: 200 steps, burn-in 50, thin 15,
              --scale tolerance (S = D / (2 * 0.05)), --dt auto (its ~40 trial gradients)
  tokens      the same with --scale tokens (S = N training tokens: the Bayesian posterior)
  tempered    the same with --scale tempered (S = sqrt(N * D / (2 * 0.05)))
  multistart  --starts 4: 4 starts fine-tuned by AdamW (15 steps each), one ray-tracing chain of
              45 steps each (burn-in 15, thin 10) at the default run's dt (no trials): 12 samples
  sgld        rtllm.SGLD at the default S, dt from the same stability search, 200 steps,
              burn-in 50, thin 15 (the loop of scripts/bench_samplers_lm.py)
  deepens     a deep ensemble of the same budget: 4 AdamW fine-tunes of 60 steps (lr 1e-3)
  auto        (not in the default list) 400 steps with --burn-in auto: twice the budget
  raygroup    (not in the default list) default with --ray-per group (one ray per layer group)
  cli         (not in the default list) `rtllm sample`'s own defaults: 1000 steps, burn-in 200,
              thin 20 (40 samples): 5x the budget

Scored on Julius Caesar (in distribution, seen by no model) and four OOD texts (each the first
TEXT_BYTES bytes): Python standard-library source, the GPL-3 text, the Apache-2.0 + BSD +
Artistic license texts, the Python reference manual's prose (pydoc_data/topics.py). Each text
is tokenized and cut into windows of 64 predicted tokens on its own; every ensemble is scored
once over all five texts. AUROC: OOD windows against in-distribution windows by their mean
epistemic uncertainty (mutual information) resp. total entropy. NLL and ECE (top-1, 15 bins):
in-distribution tokens. Targets (issue 17): epistemic AUROC >= 0.8 on every pair, BMA NLL <=
the start's, and >= the deep ensemble's AUROC / <= its NLL; the table's last columns give the gaps.

Results: one JSON line per row in WORK/results.jsonl (rows already there are reused: rerunning
continues), the markdown table on stdout and in --md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

SHAKESPEARE = Path("/work/shared/data/shakespeare")
LICENSES = Path("/usr/share/common-licenses")
SIZES = {"S": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1024),
         "M": dict(n_layer=4, n_embd=128, n_head=4, vocab_size=2048)}
SETTINGS = {"own": ("hamlet.txt", "othello.txt"), "elsewhere": ("lear.txt", "richard_iii.txt")}
SAMPLING_TEXT, HELDOUT_TEXT, ID_TEXT = "hamlet.txt", "romeo_and_juliet.txt", "julius_caesar.txt"
TEXT_BYTES = 24_000  # per evaluation text: ~6k tokens, ~90 windows of 64 (AUROC's SE ~0.03)
SEQ_LEN = 64
PIPELINES = ("start", "default", "tokens", "tempered", "multistart", "sgld", "deepens")
EXTRA_PIPELINES = ("auto", "raygroup", "cli")
OOD_NAMES = ("gpl3", "licenses", "pydoc", "python")
AUROC_TARGET = 0.8
QUIET = lambda _m: None  # noqa: E731


# -- texts and models ---------------------------------------------------------------------------
def _snippet(work: Path, name: str, text: str) -> Path:
    path = work / "texts" / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text[:TEXT_BYTES], encoding="utf-8")
    return path


def texts(work: Path) -> dict[str, Path]:
    """Evaluation texts by name: "id" (Julius Caesar) first, then the OOD texts."""
    from rtllm.lm.corpus import python_source_files

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    python = "".join(p.read_text(encoding="utf-8", errors="replace") for p in python_source_files(TEXT_BYTES))
    licenses = "".join((LICENSES / n).read_text(errors="replace") for n in ("Apache-2.0", "BSD", "Artistic"))
    topics = (stdlib / "pydoc_data" / "topics.py").read_text(encoding="utf-8", errors="replace")
    return {"id": _snippet(work, "id", (SHAKESPEARE / ID_TEXT).read_text(encoding="utf-8")),
            "gpl3": _snippet(work, "gpl3", (LICENSES / "GPL-3").read_text(errors="replace")),
            "licenses": _snippet(work, "licenses", licenses),
            "pydoc": _snippet(work, "pydoc", topics[len(topics) // 3:]),
            "python": _snippet(work, "python", python)}


def pretrained(work: Path, size: str, setting: str) -> Path:
    from rtllm.lm.pretrain import ensure_pretrained

    return ensure_pretrained(work / f"model-{size}-{setting}", texts=[SHAKESPEARE / n for n in SETTINGS[setting]],
                             steps=300, seq_len=SEQ_LEN, log=None, **SIZES[size])


def base_config(model: Path, out: Path, **kw):
    from rtllm.run.config import SampleConfig

    base = dict(model=str(model), train=(str(SHAKESPEARE / SAMPLING_TEXT),),
                heldout=(str(SHAKESPEARE / HELDOUT_TEXT),), out=str(out), steps=200, burn_in=50,
                thin=15, batch_size=8, seq_len=SEQ_LEN, log_every=10, seed=0)
    base.update(kw)
    return SampleConfig(**base)


# -- scoring ------------------------------------------------------------------------------------
class Scorer:
    """Every ensemble of one model scored on the same windows of the evaluation texts, in memory."""

    def __init__(self, model_dir: Path, text_paths: dict[str, Path]) -> None:
        import torch
        from rtllm.lm.data import pack, read_texts, tokenize_texts
        from rtllm.lm.model_io import load_model_and_tokenizer

        self.model_dir = model_dir
        self.model, tokenizer = load_model_and_tokenizer(model_dir, dtype=torch.float32)
        self.model.eval()
        self.start = {k: v.clone() for k, v in self.model.state_dict().items()}
        aliases: dict[int, list[str]] = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            aliases.setdefault(id(tensor), []).append(name)
        self.aliases = {n: names for names in aliases.values() for n in names}
        packed, labels = [], []
        for name, path in text_paths.items():
            stream, _ = tokenize_texts(read_texts([path]), tokenizer)
            w = pack(stream, SEQ_LEN, what=name)
            packed.append(w)
            labels += [name] * len(w)
        self.windows, self.labels = torch.cat(packed), np.array(labels)
        self.ood_names = [n for n in text_paths if n != "id"]
        self.tokenizer = tokenizer
        self._reference = self._baseline = None

    def features(self, state=None) -> dict:
        """The feature-distance OOD score of `rtllm evaluate` (rtllm.evaluation.feature_distance,
        reference: the sampling text, at most 256 windows) with the start's weights (as with
        --baseline) or `state`'s (the first sample, as without): per pair the AUROC, per text
        the mean distance."""
        import torch
        from rtllm.evaluation import feature_distance as fd
        from rtllm.evaluation.metrics import auroc
        from rtllm.evaluation.streaming import load_weights

        if self._reference is None:
            self._reference = fd.reference_windows(self.tokenizer, [SHAKESPEARE / SAMPLING_TEXT], SEQ_LEN)
        if state is not None:
            load_weights(self.model, state, Path("sample"), self.aliases)
        try:
            feats = fd.window_features(self.model, torch.cat([self._reference, self.windows]), torch.device("cpu"))
        finally:
            self.model.load_state_dict(self.start)
        n = len(self._reference)
        dist = fd.distances(feats[n:], *fd.fit(feats[:n]))
        ind = self.labels == "id"
        return {"n_reference_windows": n,
                "mean_distance": {k: float(dist[self.labels == k].mean()) for k in ["id"] + self.ood_names},
                "auroc": {k: auroc(dist[ind], dist[self.labels == k]) for k in self.ood_names}}

    def score(self, states, *, keep_windows: bool = False, features: str | None = None) -> dict:
        """Summary of the ensemble of `states` (state dicts, equal weights); `features`: None,
        "baseline" (the start's feature score) or "both" (and the first state's)."""
        import torch
        from rtllm.evaluation import metrics
        from rtllm.evaluation.streaming import load_weights

        acc = metrics.PredictiveAccumulator(self.windows[:, 1:])
        n, first = 0, None
        with torch.inference_mode():
            for state in states:
                first = state if first is None else first
                load_weights(self.model, state, Path("sample"), self.aliases)
                for r in range(0, len(self.windows), 32):
                    seqs = self.windows[r:r + 32]
                    logits = self.model(input_ids=seqs[:, :-1], use_cache=False).logits
                    acc.add_block(logits.reshape(-1, logits.shape[-1]), 1.0, r * SEQ_LEN)
                acc.close_sample(1.0)
                n += 1
        self.model.load_state_dict(self.start)
        f = {k: v.numpy() for k, v in acc.finalize().items()}
        per_window = {k: f[k].reshape(len(self.windows), SEQ_LEN).mean(1)
                      for k in ("epistemic", "entropy_total", "nll_bma")}
        ind = np.repeat(self.labels == "id", SEQ_LEN)
        out = {"n_samples": n, "nll_bma": float(f["nll_bma"][ind].mean()),
               "ece": metrics.ece(f["confidence"][ind], f["correct"][ind]),
               "accuracy": float(f["correct"][ind].mean()),
               "mean_epistemic_id": float(f["epistemic"][ind].mean()),
               "mean_total_id": float(f["entropy_total"][ind].mean()), "pairs": {}}
        in_w = self.labels == "id"
        for name in self.ood_names:
            o = self.labels == name
            out["pairs"][name] = {
                "auroc_epistemic": metrics.auroc(per_window["epistemic"][in_w], per_window["epistemic"][o]),
                "auroc_total": metrics.auroc(per_window["entropy_total"][in_w], per_window["entropy_total"][o]),
                "mean_epistemic": float(per_window["epistemic"][o].mean()),
                "mean_total": float(per_window["entropy_total"][o].mean())}
        if keep_windows:
            out["windows"] = {"label": self.labels.tolist(), **{k: v.tolist() for k, v in per_window.items()}}
        if features:  # rtllm evaluate's feature score: with --baseline (the start), and without
            out["feature"] = self.feature_row(first if features == "both" else None)
        return out

    def feature_row(self, first=None) -> dict:
        """{"baseline": the start's feature score (computed once), "first sample": `first`'s}."""
        if self._baseline is None:
            self._baseline = self.features()
        return {"baseline": self._baseline, **({"first sample": self.features(first)} if first is not None else {})}


def ensemble_states(ens_dir: Path):
    from rtllm.store.ensemble import Ensemble

    ens = Ensemble(ens_dir, verify=False)
    for entry in ens.entries:
        if not entry.get("masked"):
            yield ens.state_dict(entry["index"])


def member_states(out: Path):
    from safetensors.torch import load_file
    from rtllm.run.mile import member_dir

    k = 0
    while (member_dir(out, k) / "model.safetensors").is_file():
        yield load_file(member_dir(out, k) / "model.safetensors")
        k += 1


# -- pipelines ----------------------------------------------------------------------------------
def run_log(ens_dir: Path) -> list[dict]:
    from rtllm.evaluation.diagnostics import find_logs
    from rtllm.store.runlog import read_log

    return [rec for p in find_logs(ens_dir) for rec in read_log(p)]


def chain_gradients(ens_dir: Path, trial_steps: int = 10) -> int:
    """Gradients of the run's chains: every logged step, plus the dt trials' gradients."""
    recs = run_log(ens_dir)
    steps = sum(1 for r in recs if r.get("type") == "step")
    trials = sum(1 for r in recs if r.get("type") == "dt_trial")
    return steps + trials * trial_steps


def default_dt(work: Path, size: str, setting: str) -> float | None:
    recs = run_log(work / f"ens-{size}-{setting}-default")
    dts = [r["dt"] for r in recs if r.get("type") == "step" and "dt" in r]
    return dts[-1] if dts else None


def verdict_of(ens_dir: Path) -> dict:
    from rtllm.evaluation.diagnostics import stationarity

    v = stationarity(ens_dir).to_json()
    return {k: v.get(k) for k in ("stationary", "trend_z", "drift_nats", "noise_nats", "rhat")}


def heldout_trend(ens_dir: Path) -> list[list[float]]:
    """(step, held-out loss) of every logged step that has one: the loss trend over the chain."""
    return [[r["step"], round(r["heldout_loss"], 4)] for r in run_log(ens_dir)
            if r.get("type") == "step" and "heldout_loss" in r]


def run_sgld(model: Path, seed: int = 0, steps: int = 200, burn_in: int = 50, thin: int = 15):
    """SGLD from `model` at the default S; returns (state dicts, info)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from bench_samplers_lm import Chain, LMSettings, Problem
    from rtllm.lm.data import TokenData, context_length, read_texts
    from rtllm.lm.model_io import load_model_and_tokenizer, prepare_for_sampling

    net, tokenizer = load_model_and_tokenizer(model, dtype=torch.float32)
    prepare_for_sampling(net, checkpointing=False)
    data = TokenData.from_texts(tokenizer, read_texts([SHAKESPEARE / SAMPLING_TEXT]),
                                heldout=read_texts([SHAKESPEARE / HELDOUT_TEXT]), seq_len=SEQ_LEN,
                                context=context_length(net))
    s = LMSettings(budget=steps + 60, samples=10, members=1, seed=seed)
    chain = Chain(Problem(model, net, data, data.heldout[:1]), s, "sgld", None, seed)
    tuned = chain.search_dt(60)
    states, heldout = [], []
    for t in range(steps):
        chain.step(chain.loss_and_grad(chain.grads))
        if t + 1 > burn_in and (t + 1 - burn_in) % thin == 0:
            states.append({k: v.detach().clone() for k, v in chain.model.state_dict().items()})
            with torch.no_grad():
                seqs = data.heldout[:16]
                from rtllm.lm.loss import lm_loss
                heldout.append([t + 1, round(float(lm_loss(chain.model, seqs[:, :-1], seqs[:, 1:])), 4)])
    return states, {"gradients": chain.grads, "dt": tuned["dt"], "trials": tuned["trials"], "heldout": heldout}


def run_pipeline(name: str, model: Path, out: Path, work: Path, size: str, setting: str):
    """Run pipeline `name`; returns (state dict iterable, info dict)."""
    from rtllm.run.config import MemberTraining
    from rtllm.run.mile import MileConfig, run_mile
    from rtllm.run.sampling import sample

    if name == "start":
        from safetensors.torch import load_file

        return [load_file(model / "model.safetensors")], {"gradients": 0}
    if name == "sgld":
        return run_sgld(model)
    done = (out / "ensemble.json").is_file()
    if name in ("default", "tokens", "tempered", "auto", "raygroup", "cli"):
        if not done:
            kw = {"auto": dict(steps=400, burn_in="auto"), "raygroup": dict(ray_per="group"),
                  "cli": dict(steps=1000, burn_in=200, thin=20)}.get(
                name, dict(scale="tolerance" if name == "default" else name))
            sample(base_config(model, out, **kw), overwrite=True, log=QUIET)
        info = {"gradients": chain_gradients(out), **verdict_of(out), "heldout": heldout_trend(out)}
        return ensemble_states(out), info
    if name == "multistart":
        if not done:
            dt = default_dt(work, size, setting)
            cfg = base_config(model, out, steps=45, burn_in=15, thin=10, **({"dt": dt} if dt else {}))
            run_mile(MileConfig(members=4, sampling=dataclasses.replace(cfg, sampler="ray"),
                                training=MemberTraining(lr=1e-3, max_steps=15, eval_every=15, patience=1)),
                     overwrite=True, log=QUIET)
        grads = chain_gradients(out) + 4 * 15
        return ensemble_states(out), {"gradients": grads, **verdict_of(out), "heldout": heldout_trend(out)}
    if name == "deepens":  # the members, exported by a 2-step chain that does not move (dt ~ 0)
        if not done:
            cfg = base_config(model, out, steps=2, burn_in=1, thin=1, dt=1e-12)
            run_mile(MileConfig(members=4, sampling=dataclasses.replace(cfg, sampler="ray"),
                                training=MemberTraining(lr=1e-3, max_steps=60, eval_every=60, patience=1)),
                     overwrite=True, log=QUIET)
        return member_states(out), {"gradients": 4 * 60}
    raise ValueError(name)


def add_features(work: Path, sizes, settings, pipelines) -> None:
    """The feature-distance column for rows already in WORK/results.jsonl, without sampling
    again: the start's features (rtllm evaluate --baseline) and the first sample's (without),
    from the ensembles in WORK (SGLD keeps no samples: baseline only). Into WORK/features.jsonl."""
    path = work / "features.jsonl"
    have = {(r["size"], r["setting"], r["pipeline"]) for r in _jsonl(path)}
    text_paths, scorers = texts(work), {}
    for row in _jsonl(work / "results.jsonl"):
        key = (row["size"], row["setting"], row["pipeline"])
        if key in have or row["size"] not in sizes or row["setting"] not in settings or row["pipeline"] not in pipelines:
            continue
        size, setting, name = key
        if (size, setting) not in scorers:
            scorers[size, setting] = Scorer(pretrained(work, size, setting), text_paths)
        ens_dir = work / f"ens-{size}-{setting}-{name}"
        states = (member_states(ens_dir) if name == "deepens" else ensemble_states(ens_dir)
                  if (ens_dir / "ensemble.json").is_file() and name != "start" else iter(()))
        feature = scorers[size, setting].feature_row(next(iter(states), None))
        with open(path, "a") as f:
            f.write(json.dumps({"size": size, "setting": setting, "pipeline": name, "feature": feature}) + "\n")
        print(json.dumps({"size": size, "setting": setting, "pipeline": name,
                          **{k: v["auroc"] for k, v in feature.items()}}), flush=True)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def with_features(rows: list[dict], paths) -> list[dict]:
    """Rows with the "feature" entries of features.jsonl files merged in (by size, setting, pipeline)."""
    extra = {(r["size"], r["setting"], r["pipeline"]): r["feature"] for p in paths for r in _jsonl(p)}
    return [r if "feature" in r or (r["size"], r["setting"], r["pipeline"]) not in extra else
            {**r, "feature": extra[r["size"], r["setting"], r["pipeline"]]} for r in rows]


# -- the table ----------------------------------------------------------------------------------
def gaps(row: dict, start: dict | None, deepens: dict | None) -> dict:
    """Per target: the margin (>= 0 met; < 0: missed by that much)."""
    g = {"auroc_min": min(v["auroc_epistemic"] for v in row["pairs"].values()) - AUROC_TARGET}
    if start is not None:
        g["nll_vs_start"] = start["nll_bma"] - row["nll_bma"]
    if deepens is not None:
        g["auroc_vs_deepens"] = min(row["pairs"][p]["auroc_epistemic"] - deepens["pairs"][p]["auroc_epistemic"]
                                    for p in row["pairs"])
        g["nll_vs_deepens"] = deepens["nll_bma"] - row["nll_bma"]
    return g


def table(rows: list[dict]) -> str:
    pairs = [p for p in OOD_NAMES if any(p in r.get("pairs", {}) for r in rows)]
    head = ("| size | tok. | pipeline | grads | n | " + " | ".join(f"{p} epi / tot" for p in pairs) +
            " | BMA NLL | ECE | stationary (z) | AUROC - 0.8 (min) | start - NLL | vs deep ens.: AUROC (min) / NLL |" +
            (" feature AUROC " + " / ".join(pairs) + ": baseline; first sample |" if any("feature" in r for r in rows) else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by = {(r["size"], r["setting"], r["pipeline"]): r for r in rows}
    for r in rows:
        start, de = by.get((r["size"], r["setting"], "start")), by.get((r["size"], r["setting"], "deepens"))
        cells = []
        for p in pairs:
            v = r["pairs"].get(p)
            cells.append("n/a" if v is None or r["pipeline"] == "start" else
                         f"{v['auroc_epistemic']:.2f} / {v['auroc_total']:.2f}")
        stat = "n/a" if r.get("stationary") is None else f"{r['stationary']} ({r['trend_z']:+.1f})"
        if r["pipeline"] == "start":
            g_cells = ["n/a", "n/a", "n/a"]
        else:
            g = gaps(r, start, de if r["pipeline"] != "deepens" else None)
            g_cells = [f"{g['auroc_min']:+.2f}", f"{g['nll_vs_start']:+.3f}" if "nll_vs_start" in g else "n/a",
                       f"{g['auroc_vs_deepens']:+.2f} / {g['nll_vs_deepens']:+.3f}" if "nll_vs_deepens" in g else "n/a"]
        feat = ""
        if any("feature" in x for x in rows):
            f = r.get("feature", {})
            feat = " " + ("; ".join(" / ".join(f"{f[m]['auroc'][p]:.2f}" for p in pairs) for m in ("baseline", "first sample")
                                    if m in f) or "n/a") + " |"
        lines.append(f"| {r['size']} | {r['setting']} | {r['pipeline']} | {r['gradients']} | {r['n_samples']} | "
                     + " | ".join(cells) + f" | {r['nll_bma']:.3f} | {r['ece']:.3f} | {stat} | " + " | ".join(g_cells) + " |"
                     + feat)
    return "\n".join(lines)


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES + EXTRA_PIPELINES)
    p.add_argument("--md", type=Path, help="also write the markdown table here")
    p.add_argument("--table-from", type=Path, nargs="+", metavar="JSONL",
                   help="only print the table of these results files (rows in size, setting, pipeline order); "
                        "a features.jsonl next to each is merged in")
    p.add_argument("--add-features", action="store_true",
                   help="only add the feature-distance column to the rows in WORK/results.jsonl (no sampling): "
                        "WORK/features.jsonl")
    args = p.parse_args()
    if args.add_features:
        torch.set_num_threads(1)
        add_features(args.work, args.sizes, args.settings, args.pipelines)
        return
    if args.table_from:
        rows = [json.loads(line) for path in args.table_from for line in path.read_text().splitlines()]
        rows = with_features(rows, [path.parent / "features.jsonl" for path in args.table_from])
        order = {name: i for i, name in enumerate(PIPELINES + EXTRA_PIPELINES)}
        rows.sort(key=lambda r: (list(SIZES).index(r["size"]), list(SETTINGS).index(r["setting"]), order[r["pipeline"]]))
        print(table(rows))
        return
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    text_paths = texts(args.work)
    results = args.work / "results.jsonl"
    old = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    have = {(r["size"], r["setting"], r["pipeline"]): r for r in old}
    rows = []
    for size in args.sizes:
        for setting in args.settings:
            model = pretrained(args.work, size, setting)
            scorer = None
            for name in args.pipelines:
                key = (size, setting, name)
                if key in have:
                    rows.append(have[key])
                    continue
                scorer = scorer or Scorer(model, text_paths)
                t0 = time.perf_counter()
                states, info = run_pipeline(name, model, args.work / f"ens-{size}-{setting}-{name}",
                                            args.work, size, setting)
                t1 = time.perf_counter()
                row = {"size": size, "setting": setting, "pipeline": name, **info,
                       **scorer.score(states, keep_windows=True, features="baseline" if name == "start" else "both"),
                       "seconds_run": t1 - t0,
                       "seconds_score": time.perf_counter() - t1}
                rows.append(row)
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: v for k, v in row.items() if k not in ("windows", "heldout")}), flush=True)
    md = table(with_features(rows, [results.parent / "features.jsonl"]))
    print(md)
    if args.md:
        args.md.write_text(md + "\n")


if __name__ == "__main__":
    main()
