"""`rtllm evaluate`: the options, and the command that calls rtllm.evaluation."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

def _bytes(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in "kmg" and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-memory must be bytes, e.g. 1073741824 or 1G, "
                                         f"got {text!r}") from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"--max-memory must be positive, got {text!r}")
    return int(value)


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--ensemble", required=True, help="output directory of a sampling run (ensemble.json)")
    a("--data", nargs="+", required=True, help="in-distribution text: files or directories")
    a("--ood", nargs="+", help="out-of-distribution text, for the OOD AUROCs")
    a("--baseline", help="starting checkpoint directory, for its per-token NLL")
    a("--seq-len", type=int, help="tokens per window (default: the model's context, <= 1024)")
    a("--max-samples", type=int, help="evaluate that many samples, evenly spaced")
    a("--max-memory", type=_bytes,
      help="bytes for the BMA accumulator and one sample's logits, e.g. 2G (default 1G)")
    a("--mask-heldout-above", type=float, help="also drop samples whose held-out loss (nats) "
      "in the manifest exceeds this")
    a("--include-masked", action="store_true", help="use the samples the run marked masked too")
    a("--device", default="auto", help="cpu, cuda, cuda:N or auto (%(default)s)")
    a("--out", required=True, help="directory for summary.json and tokens.jsonl")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rtllm.evaluation.chain_split import evaluate_by_chain
    from rtllm.evaluation.diagnostics import diagnose, stationarity
    from rtllm.evaluation.streaming import EvalResult, evaluate, write_evaluation
    from rtllm.store.writer import atomic_write_json

    def run(masking: bool, ensemble: str | Path = args.ensemble) -> EvalResult:
        return evaluate(ensemble, args.data, ood_texts=args.ood, baseline=args.baseline,
                        seq_len=args.seq_len, max_samples=args.max_samples,
                        max_memory=args.max_memory, mask="manifest" if masking else None,
                        mask_heldout_above=args.mask_heldout_above if masking else None,
                        device=args.device,
                        progress=lambda m: print(f"rtllm evaluate: {m}", file=sys.stderr))

    out = Path(args.out)
    result = run(masking=not args.include_masked)
    verdict = _stationarity(args.ensemble, stationarity)
    if verdict is not None:
        result.summary["stationarity"] = verdict.to_json()
    chains = evaluate_by_chain(args.ensemble, result, lambda d: run(not args.include_masked, d))
    if chains is not None:  # a multi-start ensemble: what the starts disagree on, apart
        result.summary["chains"] = chains
    paths = write_evaluation(result, out)
    for key, value in result.summary.items():
        if isinstance(value, dict):
            continue
        print(f"{key:>22}  {value:.4f}" if isinstance(value, float) else f"{key:>22}  {value}")
    if result.summary["n_samples_masked"]:
        # Masked samples are reported, and the headline numbers shown with them too.
        everything = run(masking=False).summary
        atomic_write_json(out / "summary_unmasked.json", everything)
        paths["summary_unmasked"] = out / "summary_unmasked.json"
        for key in ("nll_bma", "mean_epistemic", "ece_top1"):
            print(f"{key:>22}  {result.summary[key]:.4f} without the {result.summary['n_samples_masked']} "
                  f"masked samples, {everything[key]:.4f} with them")
    try:
        diag = diagnose(args.ensemble)
    except (ValueError, FileNotFoundError) as err:  # no sampling log next to the samples
        print(f"rtllm evaluate: no convergence diagnostics ({err})", file=sys.stderr)
    else:
        atomic_write_json(out / "diagnostics.json", diag)
        paths["diagnostics"] = out / "diagnostics.json"
        fmt = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
        print(f"{'probe tau (median)':>22}  {fmt(diag['tau_median_steps'])} steps; converged "
              f"fraction {fmt(diag['fraction_converged'])}; split R-hat max {fmt(diag['rhat_max'])}")
    if verdict is not None:
        print(verdict.message)
    if chains is not None:
        print(f"{'epistemic by chain':>22}  within {chains['mean_within']:.4f}, between "
              f"{chains['mean_between']:.4f} nats/token over {chains['n_chains']} chains" +
              (f"; OOD AUROC within {chains['auroc_ood_within']:.3f}, between {chains['auroc_ood_between']:.3f}"
               if "auroc_ood_within" in chains else ""))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _stationarity(ensemble: str, stationarity):
    """The chains' stationarity verdict, or None (said on stderr) when there is no run log."""
    try:
        return stationarity(ensemble)
    except (ValueError, FileNotFoundError) as err:
        print(f"rtllm evaluate: no stationarity verdict ({err})", file=sys.stderr)
        return None
