"""`rtllm evaluate`: the options, and the command that calls rtllm.evaluation."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

def _bytes(text: str, option: str = "--max-memory") -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in "kmg" and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option} must be bytes, e.g. 1073741824 or 1G, "
                                         f"got {text!r}") from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"{option} must be positive, got {text!r}")
    return int(value)


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--ensemble", required=True, help="output directory of a sampling run (ensemble.json)")
    a("--data", nargs="+", required=True, help="in-distribution text: files or directories")
    a("--ood", nargs="+", help="out-of-distribution text, for the OOD AUROCs")
    a("--baseline", help="starting checkpoint directory, for its per-token NLL (and the model whose "
      "features the feature distance compares)")
    a("--reference", nargs="+", metavar="TEXT", help="the text the model was trained or sampled on "
      "(files or directories), for the feature-distance OOD score: how far each window is from it in "
      "the features of the baseline, else of the first sample (summary: auroc_ood_feature; default: "
      "the run's training texts recorded in ensemble.json, when they exist here; 'none': no score)")
    a("--seq-len", type=int, help="tokens per window (default: the model's context, <= 1024)")
    a("--max-samples", type=int, help="evaluate that many samples, evenly spaced")
    a("--max-memory", type=_bytes,
      help="bytes for the BMA accumulator and one sample's logits, e.g. 2G (default: 1G)")
    a("--mask-heldout-above", type=float, help="also drop samples whose held-out loss (nats) "
      "in the manifest exceeds this")
    a("--include-masked", action="store_true", help="use the samples the run marked masked too")
    a("--allow-degenerate", action="store_true", help="evaluate even when a chain did not move (most "
      "steps undone, or samples that are copies); refused by default")
    a("--device", default="auto", help="cpu, cuda, cuda:N or auto (%(default)s)")
    a("--encoding", help="encoding of the text files, e.g. latin-1 (default: UTF-8; text that does not "
      "decode is refused)")
    a("--out", required=True, help="directory for the results: summary.json (the numbers), "
      "tokens.jsonl (one line per token), reliability.png, uncertainty_by_position.png, tokens.html "
      "(the text shaded by uncertainty), diagnostics.json (convergence), summary_unmasked.json "
      "(when samples are masked) and evaluation.json (its inputs; written last, when complete). "
      "Other files there are left alone")
    add_offload_args(p)
    a("--recompute", action="store_true", help="evaluate again even if --out holds a complete "
      "evaluation of the same ensemble, texts and options (it is reused otherwise)")


def add_offload_args(p: argparse.ArgumentParser) -> None:
    """Samples larger than the device (accelerate's big-model dispatch), for evaluate and generate."""
    a = p.add_argument
    a("--offload", type=lambda t: _bytes(t, "--offload"), help="keep at most this much of each sample's "
      "weights on the device, e.g. 4G; accelerate dispatches the layers that do not fit to host memory "
      "(on the CPU: to disk) and brings them in layer by layer (default: the whole sample on the device)")
    a("--offload-host", type=lambda t: _bytes(t, "--offload-host"), help="with --offload on a GPU: at "
      "most this much in host memory, the rest on disk (default: the free host memory)")
    a("--offload-dir", help="with --offload: where the layers that go to disk are written (default: a "
      "temporary directory, removed at the end)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rtllm.evaluation.job import EvalJob, run_job

    if not args.allow_degenerate:  # a chain of copies is no ensemble (rtllm.samplers.movement)
        from rtllm.evaluation.movement_check import refuse_degenerate

        refuse_degenerate(args.ensemble)
    job = EvalJob(ensemble=args.ensemble, data=tuple(args.data), out=args.out, ood=tuple(args.ood or ()),
                  baseline=args.baseline, seq_len=args.seq_len, max_samples=args.max_samples,
                  max_memory=args.max_memory, mask_heldout_above=args.mask_heldout_above,
                  include_masked=args.include_masked, device=args.device, encoding=args.encoding,
                  recompute=args.recompute, offload=args.offload, offload_host=args.offload_host,
                  offload_dir=args.offload_dir,
                  reference=None if args.reference is None else tuple(args.reference))
    done = run_job(job, say=lambda m: print(f"rtllm evaluate: {m}", file=sys.stderr))
    for key, value in done.summary.items():
        if isinstance(value, dict) or key == "epistemic_note":  # the verdict, the note: below
            continue
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        print(f"{key:>22}  {value:.4f}" if isinstance(value, float) else f"{key:>22}  {value}")
    if done.summary_unmasked is not None:
        for key in ("nll_bma", "mean_epistemic", "ece_top1"):
            print(f"{key:>22}  {done.summary[key]:.4f} without the {done.summary['n_samples_masked']} "
                  f"masked samples, {done.summary_unmasked[key]:.4f} with them")
    if done.diagnostics_missing:
        print(f"rtllm evaluate: no convergence diagnostics ({done.diagnostics_missing})", file=sys.stderr)
    if done.diagnostics is not None:
        diag = done.diagnostics
        fmt = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
        print(f"{'probe tau (median)':>22}  {fmt(diag['tau_median_steps'])} steps; converged "
              f"fraction {fmt(diag['fraction_converged'])}; split R-hat max {fmt(diag['rhat_max'])}")
    if done.feature_missing:
        print(f"rtllm evaluate: {done.feature_missing}", file=sys.stderr)
    if done.summary.get("stationarity"):
        print(done.summary["stationarity"]["message"])
    if done.summary.get("epistemic_note"):
        print(f"note: {done.summary['epistemic_note']}")
    chains = done.summary.get("chains")
    if chains is not None:
        print(f"{'epistemic by chain':>22}  within {chains['mean_within']:.4f}, between "
              f"{chains['mean_between']:.4f} nats/token over {chains['n_chains']} chains" +
              (f"; OOD AUROC within {chains['auroc_ood_within']:.3f}, between {chains['auroc_ood_between']:.3f}"
               if "auroc_ood_within" in chains else ""))
    print(f"{'reused' if done.reused else 'wrote'} in {Path(args.out).resolve()}: "
          + ", ".join(sorted(p.name for p in done.paths.values())))
    return 0

