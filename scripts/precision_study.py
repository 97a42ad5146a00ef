"""Precision study: does a 16-bit sampler state sample the same posterior as a float64 one?

The ray tracing step v <- a v + b g + c n, x <- x + d v (coefficients from `rtllm.samplers.rules`, exact
gradients) is run with the state stored in each layout (precision_storage.py: fp32, the exact
fp32-split, Kahan-style bf16 pairs, bf16 with stochastic or nearest rounding, for x and for v)
and compared with the same chain in float64. Storage is emulated as a fused kernel does it:
load and upcast to fp32, update in fp32 (x drifts with the unrounded new v), store rounded.

The gradient is evaluated in float64 at the stored position (hi + lo for a pair): the study
isolates the state's storage; the bf16 compute copy of a real run is the same for fp32 and the
pairs (hi = bf16(x)) and is x itself for bf16-sr. Chains start at the mode / trained checkpoint,
as sampling does, so a frozen chain shows up as too little spread.

Targets (dt such that a typical coordinate moves ~1e-4 of its magnitude per step):
- gauss: D-dim Gaussian, means ~ N(0, 0.02^2) (magnitudes of LM weights, so the bf16 ulp is
  realistic), widths sigma log-uniform over [2.5e-4, 4e-3], i.e. ~2 to ~60 bf16 ulps of the mean.
- lm: the tiny GPT-2 of tests/tiny_gpt2.py after a few seconds of AdamW, float64 forward,
  minibatch gradients, S = D / (2 * 0.05); held-out loss on a fixed later slice of the corpus.

Each statistic is a series along the chain. --compare stationary (gauss default): its mean's
standard error is the largest of Sokal's (rtllm.evaluation.diagnostics), batch means and the chains'
spread; transient (lm default): independent chains from the start, compared at equal times,
se from the spread over chains. z = (layout - float64) / sqrt(se_layout^2 + se_float64^2); a
layout passes when every primary statistic (PRIMARY) has |z| < 2.

    .venv/bin/python scripts/precision_study.py gauss --out precision-gauss
    .venv/bin/python scripts/precision_study.py lm --out precision-lm --layouts fp64,fp32,pair-bf16
    .venv/bin/python scripts/precision_study.py drift    # the drift speed each storage realizes
A finished layout is kept in --out (written atomically) and skipped when the run is repeated.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rtllm.samplers import rules
from rtllm.samplers.autocorr import integrated_autocorr_time

# The storage emulation; run as a script (or with scripts/ on sys.path) so this resolves.
from precision_storage import LAYOUTS, bytes_per_param, decode, drift_speed, encode, parse_layout

REFERENCE = "fp64"
MEAN_ABS_NORMAL = math.sqrt(2 / math.pi)  # E|v_i| for unit-normal velocity components


# ------------------------------------------------------------------------------ the chain
@torch.no_grad()
def run_chains(layout: str, target, *, chains: int, dt: float, refresh_rate: float, steps: int,
               burn_in: int, every: int, seed: int) -> dict[str, np.ndarray]:
    """Ray tracing chains [chains, D] in one layout; returns {statistic: series [n, chains]}."""
    xk, vk = parse_layout(layout)
    wide = layout == REFERENCE
    dtype = torch.float64 if wide else torch.float32
    noise_gen = torch.Generator().manual_seed(seed)
    round_gen = torch.Generator().manual_seed(seed + 1_000_003)
    x = encode(xk, target.start(chains), round_gen)
    v0 = torch.randn(chains, target.dim, dtype=torch.float64, generator=noise_gen)
    v = encode(vk, v0, round_gen)
    dims = np.full(chains, float(target.dim))
    records: dict[str, list] = {}
    phase = "first"
    for t in range(steps):
        xs, vs = decode(xk, x), decode(vk, v)
        g = target.grad(xs.double(), t)  # float64 [chains, D]
        # fp32 normals, as a kernel's Philox stream gives; the float64 run uses the same values.
        n = torch.randn(chains, target.dim, generator=noise_gen).to(dtype)
        m = torch.stack([vs.double(), g, n.double()], 1)  # [chains, 3, D]
        gram = torch.bmm(m, m.transpose(1, 2))  # float64 sums of every pair of (v, g, n)
        sums = gram[:, [0, 1, 0, 2, 2, 2], [0, 1, 1, 2, 0, 1]].numpy()  # vv gg vg nn nv ng
        coef = rules.compose(rules.step_schedule(phase, dt, refresh_rate), sums,
                             kick=rules.ray_kick, scale=target.scale, dim=dims,
                             refresh_rate=refresh_rate, mom_norm=1.0)
        phase = "steady"
        col = lambda c: torch.as_tensor(c, dtype=dtype)[:, None]  # noqa: E731
        # As a fused kernel: fp32 registers, v rounded on store, x drifts with the unrounded v.
        v_new = col(coef.alpha) * vs + col(coef.beta) * g.to(dtype) + col(coef.gamma) * n
        x_new = xs + coef.delta * v_new
        v, x = encode(vk, v_new, round_gen), encode(xk, x_new, round_gen)
        if t >= burn_in and (t - burn_in) % every == 0:
            for key, value in target.observe(decode(xk, x).double()).items():
                records.setdefault(key, []).append(value)
            turn = rules.step_diagnostics(sums, coef)["angle"]  # radians v turned, max over chains
            records.setdefault("turn_per_step", []).append(np.full(chains, turn))
            # |v|^2 / D: the speed, which a rounding of v that is unbiased per step still inflates
            records.setdefault("v_sq", []).append((decode(vk, v).double() ** 2).mean(1).numpy())
    return {k: np.asarray(s, dtype=np.float64) for k, s in records.items()}


# ------------------------------------------------------------------------------ targets
class GaussTarget:
    """N(mu, diag(sigma^2)), means of LM-weight magnitude, widths spread over ~2-60 bf16 ulps."""

    scale = 1.0  # ln p = -loss with loss = sum z^2 / 2

    def __init__(self, dim: int, seed: int = 0, sigma_range=(2.5e-4, 4e-3)) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.mu = 0.02 * torch.randn(dim, dtype=torch.float64, generator=gen)
        lo, hi = (math.log(s) for s in sigma_range)
        self.sigma = torch.empty(dim, dtype=torch.float64).uniform_(lo, hi, generator=gen).exp()
        self.inv_var = self.sigma ** -2
        ulp = torch.exp2(torch.floor(torch.log2(self.mu.abs())) - 7)  # bf16 spacing at mu
        self.width_in_ulps = self.sigma / ulp
        # Quartiles of sigma / ulp: bin 0 holds the widths that the bf16 grid resolves worst.
        quartiles = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
        self.edges = torch.quantile(self.width_in_ulps, quartiles)
        self.bins = torch.bucketize(self.width_in_ulps, self.edges)
        self.sign = torch.sign(self.mu)

    def start(self, chains: int) -> Tensor:
        return self.mu.expand(chains, -1).clone()  # the mode, as an optimized checkpoint

    def grad(self, x: Tensor, step: int) -> Tensor:
        return (x - self.mu) * self.inv_var

    def observe(self, x: Tensor) -> dict[str, np.ndarray]:
        z = (x - self.mu) / self.sigma
        z2 = z * z
        out = {"mean_z": z.mean(1), "toward_zero": -(self.sign * z).mean(1), "var_z": z2.mean(1)}
        for b in range(4):
            out[f"var_z_bin{b}"] = z2[:, self.bins == b].mean(1)
        return {k: t.numpy().copy() for k, t in out.items()}

    def exact(self) -> dict[str, float]:
        out = {"mean_z": 0.0, "toward_zero": 0.0, "var_z": 1.0, "sd_var_z": math.sqrt(2 / self.dim)}
        out.update({f"var_z_bin{b}": 1.0 for b in range(4)})
        return out

    def describe(self) -> dict:
        return {"dim": self.dim, "sigma_over_ulp_quartiles": [round(float(e), 2) for e in self.edges],
                "mean_abs_mu": float(self.mu.abs().mean())}


class TinyLMTarget:
    """The trained tiny GPT-2 in float64: minibatch loss gradients, held-out loss observed."""

    def __init__(self, workdir: Path, *, batch: int = 8, seq: int = 32, tolerance: float = 0.05,
                 train_steps: int = 600, seed: int = 0) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_gpt2 import corpus_text, save_trained_tiny_model
        from transformers import AutoTokenizer, GPT2LMHeadModel

        model_dir = workdir / "tiny-gpt2"
        if not (model_dir / "config.json").exists():
            save_trained_tiny_model(model_dir, steps=train_steps, seed=seed)
        self.model = GPT2LMHeadModel.from_pretrained(model_dir).double().eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = torch.tensor(tok(corpus_text(30_000))["input_ids"])
        self.train = ids[: len(ids) // seq * seq].view(-1, seq)
        held = torch.tensor(tok(corpus_text(4_000, offset=60_000))["input_ids"])
        self.heldout = held[: len(held) // seq * seq].view(-1, seq)[:16]
        self.params = [p for p in self.model.parameters()]
        self.x0 = torch.cat([p.detach().reshape(-1) for p in self.params])
        self.dim = self.x0.numel()
        self.scale = self.dim / (2 * tolerance)
        self.batch, self.seed = batch, seed

    def _load(self, x: Tensor) -> None:
        torch.nn.utils.vector_to_parameters(x, self.params)

    def start(self, chains: int) -> Tensor:
        return self.x0.expand(chains, -1).clone()

    def grad(self, x: Tensor, step: int) -> Tensor:
        out = torch.empty_like(x)
        for c in range(x.shape[0]):
            # Chain c sees the same minibatch sequence in every layout (common random numbers).
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 101 + c)
            batch = self.train[torch.randint(len(self.train), (self.batch,), generator=gen)]
            self._load(x[c])
            with torch.enable_grad():
                self.model.zero_grad(set_to_none=False)
                self.model(batch, labels=batch).loss.backward()
            out[c] = torch.cat([p.grad.reshape(-1) for p in self.params])
        return out

    def observe(self, x: Tensor) -> dict[str, np.ndarray]:
        held = []
        for c in range(x.shape[0]):
            self._load(x[c])
            held.append(float(self.model(self.heldout, labels=self.heldout).loss))
        rms_move = ((x - self.x0) ** 2).mean(1).sqrt()
        return {"heldout_loss": np.array(held), "rms_move": rms_move.numpy().copy()}

    def exact(self) -> dict[str, float]:
        return {}


    def describe(self) -> dict:
        return {"dim": self.dim, "scale_likelihood": self.scale,
                "median_abs_x0": float(self.x0.abs().median())}


# ------------------------------------------------------------------------------ statistics
def mean_se(series: np.ndarray, batches: int = 10) -> tuple[float, float]:
    """Mean over [n, chains] and its standard error: the largest of Sokal's estimate (tau per
    chain), the batch-means estimate (`batches` per chain, all chains pooled) and the spread of
    the chains' means over sqrt(chains). The last needs no model of the autocorrelation: with 4
    chains Sokal's estimate alone gave |z| of 1.6 rms for exact layouts (docs/precision.md)."""
    n, chains = series.shape
    variances = []
    for c in range(chains):
        s = series[:, c]
        tau = integrated_autocorr_time(s)
        tau = 1.0 if not math.isfinite(tau) else max(tau, 1.0)
        variances.append(np.var(s) * tau / n)  # a constant series (frozen chain) has se 0
    se_sokal = math.sqrt(sum(variances)) / chains
    size = n // batches
    means = series[: size * batches].reshape(batches, size, chains).mean(1)
    se_batch = float(means.std(ddof=1)) / math.sqrt(batches * chains)
    se_chains = float(series.mean(0).std(ddof=1)) / math.sqrt(chains) if chains > 1 else 0.0
    return float(series.mean()), max(se_sokal, se_batch, se_chains)


def summarize_stationary(records: dict[str, np.ndarray], primary_sd: str) -> dict[str, list[float]]:
    """{statistic: [mean, se]}, plus sd_<primary_sd>: the sd along the chain (delta method se)."""
    out = {k: list(mean_se(s)) for k, s in records.items()}
    s = records[primary_sd]
    sq_dev = (s - s.mean(0)) ** 2
    var, se_var = mean_se(sq_dev)
    sd = math.sqrt(var)
    out[f"sd_{primary_sd}"] = [sd, se_var / (2 * sd) if sd > 0 else 0.0]
    return out


def summarize_transient(records: dict[str, np.ndarray], spread_of: str) -> dict[str, list[float]]:
    """Independent chains from one start, compared at equal times: per chain, the mean over the
    second half of the run and the last value; [mean, se] over chains (se = sd / sqrt(chains)),
    plus the spread over chains of the last `spread_of` (se of an sd: sd / sqrt(2 (chains - 1)))."""
    out = {}
    for k, s in records.items():
        chains = s.shape[1]
        for name, per_chain in ((k, s[len(s) // 2:].mean(0)), (f"{k}_final", s[-1])):
            out[name] = [float(per_chain.mean()), float(per_chain.std(ddof=1) / math.sqrt(chains))]
    sd = float(records[spread_of][-1].std(ddof=1))
    out[f"spread_{spread_of}_final"] = [sd, sd / math.sqrt(2 * (chains - 1))]
    return out


def compare(stats: dict, reference: dict) -> dict[str, float]:
    """z of each statistic against the reference run; inf when both are exact and differ."""
    out = {}
    for k, (m, se) in stats.items():
        if k not in reference:  # recorded by a newer version of this script only
            continue
        m0, se0 = reference[k]
        scale = math.hypot(se, se0)
        out[k] = (m - m0) / scale if scale > 0 else (0.0 if m == m0 else math.copysign(math.inf, m - m0))
    return out


DEFAULTS = {  # per target
    "gauss": dict(chains=4, steps=48_000, burn_in=8_000, every=10, refresh_rate=250.0,
                  compare="stationary"),
    "lm": dict(chains=6, steps=1_200, burn_in=0, every=25, refresh_rate=1.0, compare="transient"),
}
# The statistics of the pass test, per (target, comparison); the others are reported.
PRIMARY = {
    ("gauss", "stationary"): ("toward_zero", "var_z", "var_z_bin0", "var_z_bin3", "sd_var_z"),
    ("gauss", "transient"): ("toward_zero", "var_z", "var_z_bin0", "var_z_bin3", "var_z_final"),
    ("lm", "transient"): ("heldout_loss", "heldout_loss_final", "rms_move_final"),
}
SPREAD_OF = {"gauss": "var_z", "lm": "heldout_loss"}  # the log-density-like statistic


# ------------------------------------------------------------------------------ driver
def write_atomic(path: Path, write) -> None:
    """Write through `write(file)` into a temporary file, then rename: a kill leaves no half file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", choices=["gauss", "lm", "drift"],
                    help="drift: the realized drift speed of each position storage (no chains)")
    ap.add_argument("--out", type=Path,
                    help="results directory: config.json, one series-<layout>.npz per layout "
                         "(a finished layout is skipped when the run is repeated)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--dim", type=int, default=10_000, help="gauss: dimensions")
    ap.add_argument("--chains", type=int, help="default: gauss 4, lm 6")
    ap.add_argument("--steps", type=int, help="per chain, burn-in included (gauss 48000, lm 1200)")
    ap.add_argument("--burn-in", type=int, help="gauss 8000, lm 0")
    ap.add_argument("--every", type=int, help="steps between observations (gauss 10, lm 25)")
    ap.add_argument("--relative-move", type=float, default=1e-4,
                    help="dt makes a coordinate of typical magnitude move this fraction per step")
    ap.add_argument("--refresh-rate", type=float, help="per unit time (gauss 250, lm 1)")
    ap.add_argument("--sigma-range", default="2.5e-4,4e-3", help="gauss: widths, log-uniform")
    ap.add_argument("--workdir", type=Path, help="lm: where the trained start is cached (OUT/work)")
    ap.add_argument("--compare", choices=["stationary", "transient"],
                    help="stationary: long chains, se from the autocorrelation time (gauss "
                         "default); transient: independent chains from the start compared at "
                         "equal times, se from the spread over chains (lm default)")
    ap.add_argument("--train-steps", type=int, default=600, help="lm: AdamW steps of the start")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.target == "drift":
        print("| x storage | realized / intended drift: mean | sd over coordinates | min | max |")
        print("|---|---:|---:|---:|---:|")
        for kind in ("fp32", "fp32-split", "pair-bf16", "pair-fp16", "bf16-sr", "bf16-rn"):
            d = drift_speed(kind, seed=args.seed)
            print(f"| {kind} | {d['mean']:.5f} | {d['sd']:.5f} | {d['min']:.4f} | {d['max']:.4f} |")
        return
    if args.out is None:
        sys.exit(f"{args.target} needs --out DIR (where the series and the summary go)")
    for key, value in DEFAULTS[args.target].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(1)
    primary = PRIMARY.get((args.target, args.compare))
    if primary is None:
        sys.exit(f"--compare {args.compare} is not available for {args.target}; use "
                 f"--compare transient")
    layouts = args.layouts.split(",")
    for name in layouts:
        try:
            parse_layout(name)
        except ValueError as err:
            sys.exit(str(err))
    if REFERENCE not in layouts:
        layouts.insert(0, REFERENCE)
    if args.target == "gauss":
        try:
            lo, hi = (float(s) for s in args.sigma_range.split(","))
        except ValueError:
            lo = hi = -1.0
        if not 0 < lo < hi:
            sys.exit(f"--sigma-range must be two widths 0 < LO < HI as LO,HI, got {args.sigma_range!r}")
        target = GaussTarget(args.dim, seed=args.seed, sigma_range=(lo, hi))
        typical = float(target.mu.abs().mean())
    else:
        args.workdir = args.workdir or args.out / "work"
        args.workdir.mkdir(parents=True, exist_ok=True)
        target = TinyLMTarget(args.workdir, train_steps=args.train_steps, seed=args.seed)
        typical = float(target.x0.abs().median())
    dt = args.relative_move * typical / MEAN_ABS_NORMAL
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("out", "layouts")}
    config.update(dt=dt, target_info=target.describe())
    args.out.mkdir(parents=True, exist_ok=True)
    config_path = args.out / "config.json"
    if config_path.exists() and json.loads(config_path.read_text()) != config:
        sys.exit(f"{args.out} holds a run with other settings; pick another --out or delete it")
    write_atomic(config_path, lambda f: f.write(json.dumps(config, indent=1).encode()))
    print(f"{args.target}: dt = {dt:.3g}, {target.describe()}", flush=True)
    for name in layouts:
        path = args.out / f"series-{name}.npz"
        if path.exists():
            continue
        t0 = time.time()
        records = run_chains(name, target, chains=args.chains, dt=dt,
                             refresh_rate=args.refresh_rate, steps=args.steps,
                             burn_in=args.burn_in, every=args.every,
                             seed=args.seed + 7919 * (1 + LAYOUTS.index(name)))  # independent
        records["seconds"] = np.array(time.time() - t0)
        write_atomic(path, lambda f: np.savez_compressed(f, **records))
        print(f"{name}: {float(records['seconds']):.0f} s", flush=True)
    report(args.out, [n for n in LAYOUTS if (args.out / f"series-{n}.npz").exists()], primary,
           SPREAD_OF[args.target], args.compare,
           target.exact() if args.compare == "stationary" else {})  # transient: not the target


def report(out: Path, layouts: list[str], primary: tuple[str, ...], spread_of: str, mode: str,
           exact: dict) -> dict:
    """Print the markdown table of z against float64; write and return summary.json."""
    summarize = summarize_stationary if mode == "stationary" else summarize_transient
    runs = {}
    for name in layouts:
        with np.load(out / f"series-{name}.npz") as data:
            records = {k: data[k] for k in data.files}
        meta = {"seconds": float(records.pop("seconds")),
                "turn_per_step": float(records.pop("turn_per_step").mean()),
                "bytes_per_param": bytes_per_param(name)}
        runs[name] = dict(meta, stats=summarize(records, spread_of))
    ref = runs[REFERENCE]["stats"]
    keys = [k for k in ref if all(k in r["stats"] for r in runs.values())]
    print(f"\nz against the float64 run; pass = |z| < 2 on {', '.join(primary)}\n")
    print("| layout | B/param | v turn/step | " + " | ".join(keys) + " | pass |")
    print("|---|---:|---:|" + "---:|" * len(keys) + ":---:|")
    if exact:  # the float64 run against the exact answer: validates the setup and the se
        z = {k: (ref[k][0] - exact[k]) / ref[k][1] for k in keys if k in exact and ref[k][1] > 0}
        print("| fp64 vs exact | | | " + " | ".join(f"{z[k]:+.1f}" if k in z else "" for k in keys)
              + " | |")
    for name, run in runs.items():
        if name == REFERENCE:
            continue
        run["z"] = z = compare(run["stats"], ref)
        run["pass"] = all(abs(z[k]) < 2 for k in primary)
        print(f"| {name} | {run['bytes_per_param']} | {run['turn_per_step']:.2g} | "
              + " | ".join(f"{z[k]:+.1f}" for k in keys) + f" | {'pass' if run['pass'] else 'FAIL'} |")
    print("\nmean +- se of each statistic:\n")
    for name, run in runs.items():
        stats = run["stats"].items()
        print(f"- {name}: " + ", ".join(f"{k} {m:.5g} +- {se:.2g}" for k, (m, se) in stats))
    write_atomic(out / "summary.json", lambda f: f.write(json.dumps(runs, indent=1).encode()))
    return runs


if __name__ == "__main__":
    main()
