"""Benchmark: ray tracing, MCLMC/MILE, HMC and SGLD compared on the same targets and budgets.

    python scripts/bench_samplers.py --json bench_samplers.json    # full: 7-9 min on 2 CPU cores
    python scripts/bench_samplers.py --quick                       # 2-3 min
    python scripts/bench_samplers.py --parts analytic,noise        # skip the LM

Protocol (docs/sampling.md, "Comparing samplers"). Same for every sampler:
- target: ln p = -S * loss (+ the same prior: none here); analytic targets have S = 1 and ln p
  as written below, the LM has S = D / (2 * 0.05) (`rtllm sample`'s default);
- gradient budget: every gradient evaluation counts, tuning included (a step() is one
  gradient; a full MCLMC step is two; an RT/HMC trajectory of n leapfrog steps is n, plus one
  where it starts); 20% of each chain's budget is for tuning, the rest for sampling;
- precision: float64 for the analytic targets, the library's fp32 state for the LM;
- start: analytic chains start from exact draws of the target (chain c of every sampler from
  the same draw; sampling restarts there after tuning), so they measure mixing, not warm-up;
  the first 10% of every sampling phase is discarded. The LM chains start at the pretrained
  checkpoint (MILE at its fine-tuned members) and see the same minibatch order.

1. Analytic targets, exact gradients: a 1000-d standard Gaussian, a 100-d Gaussian with scales
   log-spaced 0.1..1 (condition number 100) and 100-d Rosenbrock pairs (exact samples known).
   Per chain (independent seeds): ESS per gradient, conservative = min(ESS of the worst
   coordinate, ESS of ln p), divided by all the chain's gradients; ESS = n / tau, tau the
   largest of 1, Sokal's tau of the draws and 2 tau' - 1, tau' the mean Sokal tau of the even-
   and odd-indexed draws (it catches period-2 orbits, whose whole-series tau is negative, and
   gives antithetic chains no credit; draws are thinned by odd factors only, for the same reason);
   reported as the mean (min-max) over chains, with the bias of E|x|^2 and of the
   per-coordinate second moments (mean_i E x_i^2 / truth - 1) +- SE. Marked unresolved where a
   chain's ESS < 50 (rtllm.evaluation.diagnostics: below that tau itself is not trustworthy).
   Tuning: RT and HMC run trajectories of path time pi/2 (the paper's choice, a quarter period
   at unit scale) with a Metropolis test (rtllm.sample_trajectories), dt by dual averaging to
   acceptance 0.8 (Hoffman & Gelman 2014; start 0.1, gamma 0.05, t0 10, kappa 0.75). MCLMC:
   rtllm.tune_mclmc (MILE's rule) per chain, phases 80/10/10% of the tuning budget's full
   steps (MILE: 40k/5k/5k), starting at eps = 0.1 sqrt(D), L = max(sqrt(D), 15); unadjusted.
   SGLD (unadjusted): dt grid 0.4, 0.2, 0.1, 0.05, 0.025, 0.0125 (eps = dt^2/2) from the top,
   each on 1/6 of the tuning budget; the first with |bias of the per-coordinate second moments|
   < 2% is taken (the truth is known here: an advantage no real run has); see
   bench_samplers_analytic.run_sgld for why that maximizes ESS/grad under the bound.
2. The same targets with minibatch-style noise: the gradient of ln p plus sigma * xi, xi ~
   N(0, I) fresh every gradient (tests/samplers/test_noisy_gradients.py's model), sigma in 0, 1, 3, 10.
   Every sampler keeps its values tuned in part 1 and runs --noise-steps gradients per chain
   without Metropolis (RT and HMC in the optimizers' step form, partial refresh at rate
   2/pi, the same decorrelation time as the trajectories). Reported: bias of E|x|^2 relative to
   the truth, mean over chains +- SE (the SE estimator of the noise tests).
3. The tiny pretrained GPT-2 (`rtllm demo`'s model) on the bundled plays (95% train, 5%
   validation) with The Tempest as test text: each sampler's ensemble of the same size from
   the same start with the same gradient budget, scored in memory; held-out NLL of the BMA,
   ECE (top-1, 15 bins), mean epistemic uncertainty (mutual information), wall time of tuning +
   sampling (scoring excluded). Tuning: RT, HMC, SGLD all by `rtllm sample --dt auto`'s search
   (the paper's recipe), its trials counted (HMC's acceptance and SGLD's bias are not
   observable with minibatch gradients); MCLMC by tune_mclmc on the tuning budget, and
   "mclmc-search" = MCLMC with its step size from the same search (L = max(sqrt(D), 15)), to
   tell the sampler from its tuner. MILE:
   --lm-members members fine-tuned by AdamW with early stopping on the validation split
   (rtllm.run.members; their AdamW gradients are reported apart), then one MILE-tuned MCLMC chain
   per member on budget / members gradients. No step is rejected or undone for any sampler.

Prints markdown tables on stdout (progress on stderr) and writes everything to --json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_samplers_analytic as A  # noqa: E402
import bench_samplers_lm as LM  # noqa: E402

PARTS = ("analytic", "noise", "lm")
FULL = dict(seeds=3, budget=10_000, noise_steps=10_000, lm_budget=300, lm_samples=8, lm_batch=8,
            lm_eval_windows=32, lm_trial_steps=10, lm_member_steps=40)
QUICK = dict(seeds=2, budget=2_500, noise_steps=2_000, lm_budget=80, lm_samples=4, lm_batch=4,
             lm_eval_windows=16, lm_trial_steps=4, lm_member_steps=8)
DEFAULT_MODEL = "rtllm-demo/model"  # where `rtllm demo` keeps its pretrained tiny GPT-2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _range(values, fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"


def _pm(mean: float, se: float) -> str:
    if not math.isfinite(mean):
        return "diverged"
    return f"{mean:+.2%} ± {se:.2%}" if math.isfinite(se) else f"{mean:+.2%}"  # no SE below 40 draws


def tuned_text(run: A.Run) -> str:
    t = run.tuned
    if run.sampler in ("ray", "hmc"):
        return (f"dt {_range([x['dt'] for x in t], '.3g')}, {_range([x['n_leapfrog'] for x in t], 'd')} "
                f"steps, acc {_range([x['accept'] for x in t], '.2f')}")
    if run.sampler == "mclmc":
        return (f"eps {_range([x['step_size'] for x in t], '.3g')}, L {_range([x['L'] for x in t], '.3g')}, "
                f"Var[dE]/D {_range([x['energy_var_per_dim'] for x in t], '.2g')}")
    return f"dt {_range([x['dt'] for x in t], 'g')}" + ("" if all(x["passed"] for x in t) else " (bound not met)")


# -- parts ----------------------------------------------------------------------------------------
def analytic(args, targets) -> dict[str, dict[str, A.Run]]:
    out = {}
    print("\n### Exact gradients: ESS per gradient\n")
    print("| target | sampler | tuned | grads/chain (tune + sample) | ESS/grad, conservative | worst coord ESS/grad "
          "| ln p ESS/grad | bias E\\|x\\|² | bias per-coord 2nd moment | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---:|")
    for target in targets:
        x0 = target.draw(torch.Generator().manual_seed(args.seed), args.seeds)
        out[target.name] = {}
        for s in A.SAMPLERS:
            log(f"part 1: {target.name}, {s}")
            run = A.run_exact(s, target, x0, args.budget, args.seed)
            out[target.name][s] = run
            e = run.ess_per_grad()
            grads = np.array(run.grads_tune) + np.array(run.grads_sample)
            per = lambda ess: np.array(ess) / grads  # noqa: E731
            mark = "" if run.resolved() else " †"
            print(f"| {target.name} | {s} | {tuned_text(run)} | {np.mean(run.grads_tune):.0f} + "
                  f"{np.mean(run.grads_sample):.0f} | **{e.mean():.2e}**{mark} ({e.min():.1e}-{e.max():.1e}) | "
                  f"{per(run.ess_coord).mean():.2e} | {per(run.ess_lp).mean():.2e} | "
                  f"{_pm(*A.combine(run.bias, run.bias_se))} | {_pm(*A.combine(run.bias_coord, run.bias_coord_se))} "
                  f"| {run.seconds:.0f} |", flush=True)
    print(f"\n† a chain's ESS < {A.MIN_LENGTH_OVER_TAU:.0f}: not resolved by this budget (Sokal's tau is "
          f"then unreliable, and ESS = n / tau is bounded below by ~5 whatever the chain).")
    return out


def noise(args, targets, tuned: dict[str, dict[str, A.Run]]) -> dict:
    out = {}
    print("\n### Gradient noise: bias of E|x|² (mean over chains ± SE)\n")
    print("| target | sampler | " + " | ".join(f"sigma {s:g}" for s in args.sigmas) + " |")
    print("|---|---|" + "---|" * len(args.sigmas))
    for target in targets:
        x0 = target.draw(torch.Generator().manual_seed(args.seed), args.seeds)
        out[target.name] = {}
        for s in A.SAMPLERS:
            log(f"part 2: {target.name}, {s}")
            t0 = time.perf_counter()
            res = A.run_noisy(s, target, x0, tuned[target.name][s].tuned, args.sigmas, args.noise_steps,
                              args.seed + 1)
            out[target.name][s] = {"sigma": {f"{k:g}": {"bias": b, "se": se} for k, (b, se) in res.items()},
                                   "seconds": time.perf_counter() - t0}
            print(f"| {target.name} | {s} | " + " | ".join(_pm(b, se) for b, se in res.values()) + " |",
                  flush=True)
    return out


def lm(args) -> dict:
    s = LM.LMSettings(budget=args.lm_budget, samples=args.lm_samples, batch_size=args.lm_batch,
                      seq_len=args.lm_seq, eval_windows=args.lm_eval_windows, trial_steps=args.lm_trial_steps,
                      members=args.lm_members, member_steps=args.lm_member_steps, seed=args.seed)
    res = LM.lm_benchmark(args.model, s, samplers=args.lm_samplers, log=log)
    print(f"\n### Tiny GPT-2: ensembles of {s.samples} from the same start, {s.budget} gradients each\n")
    print("| sampler | tuned | grads (tune + sample) | + other | grads/sample | NLL (BMA) | BMA - start ± SE "
          "| mean single NLL | ECE | mean epistemic (in / OOD) | OOD AUROC (epistemic) | wall s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    st = res["start"]
    print(f"| start checkpoint | - | - | - | - | {st['nll_bma']:.4f} | - | {st['nll_single_mean']:.4f} | {st['ece']:.4f} | "
          f"{st['mean_epistemic']:.2e} | - | - |")
    for name in [k for k in res if k != "start"]:
        r = res[name]
        t = r.get("tuned", [{}]) if isinstance(r.get("tuned"), list) else [r.get("tuned", {})]
        if "tuned_text" in r:
            tuned = r["tuned_text"]
        elif name in ("smile", "psmile"):
            tuned = (f"eps {t[0]['step_size']:.3g} -> {r['final_step_size']:.3g} (controller), "
                     f"{r['rejections']} rejected")
        else:
            tuned = (f"{'eps' if name.startswith('mclmc') else 'dt'} {t[0]['dt']:.3g} ({t[0]['trials']} trials)"
                     if "dt" in t[0] else
                     f"eps {_range([x['step_size'] for x in t], '.3g')}, L {_range([x['L'] for x in t], '.3g')}")
        other = f"{r['forwards_tune']} fwd" + (f", {r['grads_members']} AdamW" if "grads_members" in r else "")
        wall = f"{r['seconds']:.0f}" + (f" + {r['seconds_members']:.0f}" if "seconds_members" in r else "")
        auroc = f"{r['auroc_ood_epistemic']:.3f}" if "auroc_ood_epistemic" in r else "-"
        print(f"| {name} | {tuned} | {r['grads_tune']} + {r['grads_sample']} | {other} | "
              f"{r['grads_per_sample']:.0f} | {r['nll_bma']:.4f} | "
              f"{r['nll_minus_start']:+.4f} ± {r['nll_minus_start_se']:.4f} | {r['nll_single_mean']:.4f} | "
              f"{r['ece']:.4f} | {r['mean_epistemic']:.2e} / {r.get('mean_epistemic_ood', float('nan')):.2e} | "
              f"{auroc} | {wall} |", flush=True)
    return {"settings": s.__dict__, "results": res}


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = ap.add_argument
    a("--quick", action="store_true", help="smaller budgets and ensembles (a few minutes)")
    a("--parts", default=",".join(PARTS), help="comma-separated subset of analytic,noise,lm (noise needs analytic)")
    a("--seeds", type=int, help="independent chains per sampler and target (full 3, quick 2)")
    a("--budget", type=int, help="gradients per analytic chain, tuning included (full 10000, quick 2500)")
    a("--noise-steps", type=int, help="gradients per chain and sigma in part 2 (full 10000, quick 2000)")
    a("--sigmas", default="0,1,3,10", help="gradient-noise scales of part 2")
    a("--dims", default="1000,100,100", help="dimensions of the Gaussian, ill-conditioned Gaussian, Rosenbrock")
    a("--model", type=Path, help=f"tiny pretrained model directory (default: {DEFAULT_MODEL}, pretrained "
                                 f"there by rtllm.lm.pretrain.ensure_pretrained if missing)")
    for name, kind, what in (("lm-budget", int, "gradients per LM sampler (full 300, quick 80)"),
                             ("lm-samples", int, "ensemble size (full 8, quick 4)"),
                             ("lm-batch", int, "sequences per minibatch (full 8, quick 4)"),
                             ("lm-seq", int, "tokens per sequence (64)"),
                             ("lm-eval-windows", int, "test windows of The Tempest (full 32, quick 16)"),
                             ("lm-trial-steps", int, "steps per dt trial (full 10, quick 4)"),
                             ("lm-members", int, "MILE members (2; the paper uses 12)"),
                             ("lm-member-steps", int, "most AdamW steps per MILE member (full 40, quick 8)")):
        a(f"--{name}", type=kind, help=what)
    a("--lm-samplers", default=",".join(LM.LM_SAMPLERS), help="comma-separated LM samplers (%(default)s)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=1, help="torch threads (1: fastest for these small tensors)")
    a("--json", type=Path, help="write every number here (atomically)")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.lm_seq = args.lm_seq or 64
    args.lm_members = args.lm_members or 2
    try:
        args.parts = [p for p in args.parts.split(",") if p]
        args.lm_samplers = [n for n in args.lm_samplers.split(",") if n]
        if set(args.lm_samplers) - set(LM.LM_SAMPLERS):
            ap.error(f"--lm-samplers must name some of {', '.join(LM.LM_SAMPLERS)}, got {args.lm_samplers}")
        args.sigmas = [float(s) for s in args.sigmas.split(",")]
        args.dims = [int(d) for d in args.dims.split(",")]
    except ValueError as e:
        ap.error(f"--sigmas and --dims take comma-separated numbers ({e})")
    if not args.parts or set(args.parts) - set(PARTS):
        ap.error(f"--parts must name some of {', '.join(PARTS)}, got {','.join(args.parts)}")
    if "noise" in args.parts and "analytic" not in args.parts:
        ap.error("--parts noise needs analytic too: the noisy runs use the values tuned there")
    if len(args.dims) != 3 or min(args.dims) < 2 or args.dims[2] % 2:
        ap.error(f"--dims needs three dimensions >= 2, the last even (Rosenbrock pairs), got {args.dims}")
    for name, low in (("seeds", 1), ("budget", 600), ("noise_steps", 100), ("threads", 1)):
        if getattr(args, name) < low:
            ap.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if any(not math.isfinite(s) or s < 0 for s in args.sigmas):
        ap.error(f"--sigmas must be finite and >= 0, got {args.sigmas}")
    if "lm" in args.parts:
        try:  # checked now, not after the analytic parts have run for minutes
            LM.LMSettings(budget=args.lm_budget, samples=args.lm_samples, batch_size=args.lm_batch,
                          seq_len=args.lm_seq, eval_windows=args.lm_eval_windows,
                          trial_steps=args.lm_trial_steps, members=args.lm_members,
                          member_steps=args.lm_member_steps)
        except ValueError as e:
            ap.error(str(e))
        if args.model is not None and not (args.model / "config.json").is_file():
            ap.error(f"--model {args.model} holds no config.json: pass a local Hugging Face model "
                     f"directory, or leave --model out to use (or pretrain) {DEFAULT_MODEL}")
    return args


def run_to_json(run: A.Run) -> dict:
    return {**run.__dict__, "ess_per_grad": run.ess_per_grad().tolist(), "resolved": run.resolved()}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    if "lm" in args.parts and args.model is None:
        from rtllm.lm.pretrain import ensure_pretrained

        log(f"LM: using (or pretraining, a few minutes) {DEFAULT_MODEL}")
        args.model = ensure_pretrained(DEFAULT_MODEL)
    print(f"`{' '.join(['python scripts/bench_samplers.py'] + sys.argv[1:])}` — torch {torch.__version__}, "
          f"{platform.machine()}, {torch.get_num_threads()} thread(s)")
    result: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}}
    targets = A.make_targets(*args.dims)
    if "analytic" in args.parts:
        runs = analytic(args, targets)
        result["analytic"] = {t: {s: run_to_json(r) for s, r in by.items()} for t, by in runs.items()}
        if "noise" in args.parts:
            result["noise"] = noise(args, targets, runs)
    if "lm" in args.parts:
        result["lm"] = lm(args)
    result["wall_seconds"] = time.perf_counter() - t_all
    print(f"\nwall time {result['wall_seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=float))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
