"""The tiny-GPT-2 half of scripts/bench_samplers.py: every sampler's ensemble from the same
start, with the same target, minibatches and gradient budget, scored on held-out text.

The protocol is written out in bench_samplers.py's docstring and docs/sampling.md ("Comparing
samplers"). All samplers run the library's optimizers (fp32 state) in the same small loop
here; samples are scored in memory as they are taken (rtllm.evaluation.metrics), nothing is written.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import rtllm
from rtllm.evaluation import metrics
from rtllm.run import dt_auto as tune
from rtllm.run.checkpoint import map_tensors
from rtllm.lm.corpus import heldout_files, python_source_files, train_files
from rtllm.lm.data import MinibatchOrder, TokenData, context_length, pack, read_texts, tokenize_texts
from rtllm.lm.loss import lm_loss
from rtllm.run.members import MemberTraining, train_member
from rtllm.lm.model_io import load_model_and_tokenizer, prepare_for_sampling
from rtllm.run.sampler_setup import MCLMC_START_STEP, load_init_weights

LOSS_TOLERANCE = 0.05  # S = D / (2 * 0.05) for every sampler: `rtllm sample`'s default
TUNE_SHARE = 0.2
# "mclmc-search": MCLMC with its step size from the same stability search as RT, HMC and SGLD
# instead of MILE's energy-variance tuner (which minibatch noise misleads, see the docs).
LM_SAMPLERS = ("ray", "hmc", "sgld", "mclmc", "mclmc-search", "mile", "smile", "psmile", "fiber")
SMILES = ("smile", "psmile")  # psmile: SMILE(precondition=True)
OOD_BYTES = 100_000  # of standard-library Python source, as `rtllm demo` uses


@dataclass(frozen=True)
class LMSettings:
    budget: int = 300  # gradients per sampler (MILE: split over its member chains)
    samples: int = 8  # ensemble size per sampler
    batch_size: int = 8
    seq_len: int = 64
    eval_windows: int = 32  # held-out windows of seq_len tokens (The Tempest)
    trial_steps: int = 10  # steps per dt trial of the stability search
    members: int = 2  # MILE members (the paper: 12)
    member_steps: int = 40  # most AdamW steps per member
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("budget", "samples", "batch_size", "seq_len", "eval_windows", "trial_steps",
                     "members", "member_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--lm-{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.samples % self.members:
            raise ValueError(f"--lm-samples ({self.samples}) must be a multiple of --lm-members "
                             f"({self.members}): every MILE member gives the same number of samples")
        per_chain = self.budget // self.members  # MILE's chains are the smallest
        tuning = int(TUNE_SHARE * per_chain)
        if tuning < 2 or per_chain - tuning < 4 * self.samples // self.members:
            raise ValueError(f"--lm-budget {self.budget} is too small for {self.samples} samples over "
                             f"{self.members} MILE chains (each needs 2 tuning gradients and 4 per "
                             f"sample): raise it, or lower --lm-samples or --lm-members")
        if self.trial_steps > int(TUNE_SHARE * self.budget):
            raise ValueError(f"--lm-trial-steps {self.trial_steps} exceeds the tuning budget "
                             f"{int(TUNE_SHARE * self.budget)} (20% of --lm-budget): lower it")


@dataclass
class Problem:
    model_dir: Path
    model: torch.nn.Module  # the start, never stepped
    data: TokenData  # train = 95% of the training plays, heldout = the last 5% (validation)
    # [windows, seq_len + 1]: the first n_in of The Tempest (never trained or validated on), then
    # as many of Python source (out of distribution: AUROC of telling them apart by epistemic MI)
    test: torch.Tensor
    n_in: int


def load_problem(model_dir: Path, s: LMSettings) -> Problem:
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=torch.float32)
    prepare_for_sampling(model, checkpointing=False)  # dropout off; small model: no checkpointing
    data = TokenData.from_texts(tokenizer, read_texts(train_files()), seq_len=s.seq_len,
                                context=context_length(model))
    stream, _ = tokenize_texts(read_texts(heldout_files()), tokenizer)
    windows = pack(stream, s.seq_len, what="The Tempest")
    pick = torch.linspace(0, len(windows) - 1, min(s.eval_windows, len(windows))).round().long()
    ood_stream, _ = tokenize_texts(read_texts(python_source_files(OOD_BYTES)), tokenizer)
    ood = pack(ood_stream, s.seq_len, what="Python source")
    ood_pick = torch.linspace(0, len(ood) - 1, min(len(pick), len(ood))).round().long()
    return Problem(Path(model_dir), model, data, torch.cat([windows[pick], ood[ood_pick]]), len(pick))


class Chain:
    """One sampler on a copy of the model: counted gradients on the shared minibatch order."""

    def __init__(self, p: Problem, s: LMSettings, name: str, init_dir: Path | None, seed: int) -> None:
        self.p, self.s, self.name = p, s, name
        self.model = copy.deepcopy(p.model)
        if init_dir is not None:
            load_init_weights(self.model, init_dir)
        params = [q for q in self.model.parameters() if q.requires_grad]
        self.dim = sum(q.numel() for q in params)
        scale = self.dim / (2 * LOSS_TOLERANCE)
        common = dict(scale_likelihood=scale, seed=seed)
        if name == "ray":
            self.sampler = rtllm.RayTracer(params, dt=1.0, ray="model", **common)
        elif name == "hmc":
            self.sampler = rtllm.HMC(params, dt=1.0, **common)
        elif name == "sgld":
            self.sampler = rtllm.SGLD(params, dt=1.0, **common)
        elif name in SMILES:
            self.sampler = rtllm.SMILE(params, step_size=MCLMC_START_STEP, ray="model",
                                       precondition=name == "psmile", **common)
        else:
            self.sampler = rtllm.MCLMC(params, step_size=MCLMC_START_STEP, L=max(math.sqrt(self.dim), 15.0),
                                       ray="model", **common)
        self.mclmc = name.startswith("mclmc") or name in SMILES  # full steps of two gradients
        self._step_batch = -1  # SMILE: the minibatch of the full step in progress
        self.order = MinibatchOrder(len(p.data.train), s.batch_size, s.seed)  # the same for all
        self.grads = self.forwards = 0

    def loss_and_grad(self, cursor: int) -> torch.Tensor:
        seqs = self.p.data.train[self.order.batch(cursor)]
        self.sampler.zero_grad()
        loss = lm_loss(self.model, seqs[:, :-1], seqs[:, 1:])
        loss.backward()
        self.grads += 1
        return loss.detach().double()

    @torch.no_grad()
    def mean_loss(self, cursors) -> float:
        losses = []
        for c in cursors:
            seqs = self.p.data.train[self.order.batch(c)]
            losses.append(float(lm_loss(self.model, seqs[:, :-1], seqs[:, 1:])))
            self.forwards += 1
        return sum(losses) / len(losses)

    # -- tuning ---------------------------------------------------------------------------
    def set_step(self, value: float) -> None:
        if self.mclmc:
            self.sampler.step_size = value
        else:
            for group in self.sampler.param_groups:
                group["dt"] = value

    def next_cursor(self) -> int:
        """The next gradient's minibatch; SMILE's full step keeps one for both of its gradients."""
        if self.name in SMILES and self.sampler.phase in ("mid", "mid_close"):
            return self._step_batch
        return self.grads

    def step(self, loss: torch.Tensor) -> None:
        if self.name in SMILES:  # a step's two ends scored on its minibatch: one forward more
            start = self.sampler.phase == "start"
            end = self.mean_loss([self._step_batch]) if start and self._step_batch >= 0 else None
            if start:
                self._step_batch = self.grads - 1
            self.sampler.step(loss=loss, end_loss=end)
        elif self.mclmc:
            self.sampler.step(loss=loss)  # the loss keeps MCLMC's energy ledger
        else:
            self.sampler.step()

    def search_dt(self, budget: int) -> dict:
        """`rtllm sample --dt auto` (the paper's recipe: from 0.03/sqrt(D), shrink 10x while a
        trial diverges, then double while stable) with every trial's gradients counted; stops
        early when the next trial would overrun the tuning budget. For MCLMC the searched value
        is the step size, a path length: from 0.03, the path of RT's dt0 at speed sqrt(D)."""
        k = self.s.trial_steps
        dt0 = MCLMC_START_STEP if self.mclmc else tune.initial_dt(self.dim)
        start = self.mean_loss(range(k))
        trials: list[tune.Trial] = []

        class Spent(Exception):
            pass

        def trial(dt: float) -> tune.Trial:
            if self.grads + k > budget:
                raise Spent
            saved = map_tensors(self.sampler.state_dict(), lambda t: t.clone())
            self.set_step(dt)
            end = math.inf
            for c in range(k):
                loss = self.loss_and_grad(c)
                if not math.isfinite(float(loss)):
                    break
                self.step(loss)
            else:
                end = self.mean_loss(range(k))
            self.sampler.load_state_dict(saved)
            trials.append(tune.Trial(dt, start, end, tune.is_stable(start, end, LOSS_TOLERANCE)))
            return trials[-1]

        try:
            dt, _ = tune.search_dt(trial, dt0)
            complete = True
        except (Spent, RuntimeError):
            stable = [t.dt for t in trials if t.stable]
            dt = max(stable) if stable else min((t.dt for t in trials), default=dt0)
            complete = False
        self.set_step(dt)
        return {"dt": dt, "trials": len(trials), "search_complete": complete,
                "trial_losses": [[t.dt, round(t.end_loss - t.start_loss, 4)] for t in trials]}

    def tune(self, budget: int) -> dict:
        """Tune on at most `budget` gradients; returns what was chosen."""
        if self.name in SMILES:  # its controller adapts eps while it samples: no tuning budget
            return {"step_size": self.sampler.step_size, "L": math.inf}
        if self.name != "mclmc":
            return self.search_dt(budget)  # MCLMC with a fixed L = max(sqrt(D), 15) for "mclmc-search"
        full = budget // 2  # MILE's 80/10/10% phases of the tuning budget's full steps
        two = three = full // 10

        batch = {"cursor": -1}

        def closure() -> tuple[torch.Tensor, float | None]:
            # As `rtllm sample --sampler mclmc`: a full step's two gradients share a minibatch,
            # and both ends of the step are scored on it (one forward more per full step), or
            # the energy the tuner reads is S x the loss difference between batches.
            end = None
            if self.sampler.phase == "start":
                if batch["cursor"] >= 0:
                    end = self.mean_loss([batch["cursor"]])
                batch["cursor"] = self.grads
            return self.loss_and_grad(batch["cursor"]), end

        eps, L, info = rtllm.tune_mclmc(self.sampler, closure, phase1=full - two - three, phase2=two,
                                        phase3=three, seed=self.s.seed)
        return {"step_size": eps, "L": L, "phases": [full - two - three, two, three],
                "divergences": int(info.divergences.sum())}

    # -- sampling -------------------------------------------------------------------------
    def run(self, budget: int, n_samples: int, acc: metrics.PredictiveAccumulator) -> dict:
        """Tune, then sample for the rest of `budget` gradients; `n_samples` evenly spaced over
        the second half of the sampling phase (the last at its end) go into `acc`."""
        t0 = time.perf_counter()
        tuned = self.tune(int(TUNE_SHARE * budget))
        tune_grads, tune_forwards = self.grads, self.forwards
        mclmc = self.mclmc
        steps = budget - self.grads
        steps -= steps % 2 if mclmc else 0  # MCLMC samples only at full-step boundaries
        thin = max(1, steps // 2 // n_samples)
        thin += thin % 2 if mclmc else 0
        take = {steps - j * thin for j in range(n_samples)}  # the second half of the phase
        eval_s, losses, due, off_grid = 0.0, [], 0, 0
        for i in range(1, steps + 1):
            loss = self.loss_and_grad(self.next_cursor())
            self.step(loss)
            losses.append(float(loss))
            # A sample due off a full-step boundary (a divergence or SMILE's rejection restarted
            # a step on an odd gradient) waits for the next boundary, as in `rtllm sample`.
            due += i in take
            if due and (not mclmc or self.sampler.phase == "start" or i == steps):
                off_grid += mclmc and self.sampler.phase != "start"  # only at the very end
                t1 = time.perf_counter()
                for _ in range(due):
                    score(self.model, self.p.test, acc)
                eval_s += time.perf_counter() - t1
                due = 0
        return {"tuned": tuned, "grads_tune": tune_grads, "grads_sample": self.grads - tune_grads,
                "forwards_tune": tune_forwards, "samples": len(take), "samples_off_grid": off_grid,
                "train_loss_first_last": [losses[0], sum(losses[-10:]) / len(losses[-10:])],
                **({"final_step_size": self.sampler.step_size, "rejections": self.sampler.rejections}
                   if self.name in SMILES else {}),
                "skipped_or_diverged": int(getattr(self.sampler, "divergences", 0)
                                           + getattr(self.sampler, "skipped_steps", 0)),
                "seconds": time.perf_counter() - t0 - eval_s}


@torch.no_grad()
def score(model: torch.nn.Module, windows: torch.Tensor, acc: metrics.PredictiveAccumulator) -> None:
    """One ensemble member's next-token predictions on the test windows."""
    logits = model(windows[:, :-1]).logits
    acc.add(logits.reshape(-1, logits.shape[-1]))


def summary(acc: metrics.PredictiveAccumulator, windows: int, tokens: int) -> dict:
    """Mean per-token scores of an ensemble over the first `windows` test windows of `tokens`
    tokens (nats); the windows after them are OOD: AUROC of telling OOD from in-distribution
    windows by their mean epistemic uncertainty (mutual information), as `rtllm evaluate`."""
    full = acc.finalize()
    cut = windows * tokens
    f = {k: v[:cut] for k, v in full.items()}
    epi = full["epistemic"].reshape(-1, tokens).mean(1).numpy()
    out = {"nll_bma": float(f["nll_bma"].mean()),
           "window_nll": f["nll_bma"].reshape(windows, -1).mean(1).tolist(),
           "nll_single_mean": float(f["nll_samples_mean"].mean()),
           "ece": metrics.ece(f["confidence"].numpy(), f["correct"].numpy()),
           "mean_epistemic": float(f["epistemic"].mean()), "accuracy": float(f["correct"].double().mean())}
    if len(epi) > windows:
        out["mean_epistemic_ood"] = float(full["epistemic"][cut:].mean())
        out["auroc_ood_epistemic"] = metrics.auroc(epi[:windows], epi[windows:])
    return out


def run_mile(p: Problem, s: LMSettings, acc: metrics.PredictiveAccumulator,
             deep: metrics.PredictiveAccumulator | None = None) -> dict:
    """MILE: K members fine-tuned by AdamW with early stopping on the validation split
    (rtllm.run.members), then one MCLMC chain per member on budget / K gradients (MILE-tuned).
    `deep`: the K members themselves scored as a deep ensemble (before their chains run)."""
    training = MemberTraining(max_steps=s.member_steps, eval_every=max(1, s.member_steps // 4),
                              patience=2, batch_size=s.batch_size)
    out = {"members": [], "chains": [], "grads_members": 0, "seconds_members": 0.0}
    with tempfile.TemporaryDirectory(prefix="bench-samplers-mile-") as work:
        for k in range(s.members):
            t0 = time.perf_counter()
            info = train_member(p.model_dir, p.data, Path(work) / f"member-{k}", member=k, seed=s.seed,
                                settings=training, device=torch.device("cpu"), reuse=False,
                                log=lambda _m: None)
            out["seconds_members"] += time.perf_counter() - t0
            out["grads_members"] += info["steps_run"]
            out["members"].append({k2: info[k2] for k2 in ("start_heldout_nll", "best_heldout_nll",
                                                          "best_step", "steps_run")})
            chain = Chain(p, s, "mclmc", Path(work) / f"member-{k}", s.seed + 1 + k)
            if deep is not None:  # the member as trained, before its chain moves it
                score(chain.model, p.test, deep)
            out["chains"].append(chain.run(s.budget // s.members, s.samples // s.members, acc))
    chains = out["chains"]
    return {"tuned": [c["tuned"] for c in chains], "members": out["members"],
            "grads_tune": sum(c["grads_tune"] for c in chains),
            "grads_sample": sum(c["grads_sample"] for c in chains), "grads_members": out["grads_members"],
            "forwards_tune": sum(c["forwards_tune"] for c in chains),
            "samples": sum(c["samples"] for c in chains),
            "skipped_or_diverged": sum(c["skipped_or_diverged"] for c in chains),
            "seconds": sum(c["seconds"] for c in chains), "seconds_members": out["seconds_members"]}


def lm_benchmark(model_dir: Path, s: LMSettings, samplers=LM_SAMPLERS, log=print) -> dict:
    """Every sampler's ensemble scored on the test windows; plus the start checkpoint alone."""
    p = load_problem(model_dir, s)
    start = metrics.PredictiveAccumulator(p.test[:, 1:])
    score(p.model, p.test, start)
    results = {"start": {**summary(start, p.n_in, p.test.shape[1] - 1), "samples": 1}}
    base = torch.tensor(results["start"]["window_nll"], dtype=torch.float64)
    log(f"LM: {sum(q.numel() for q in p.model.parameters())} parameters, {len(p.data.train)} training "
        f"sequences of {s.seq_len}, {p.test[:, 1:].numel()} test tokens; start NLL "
        f"{results['start']['nll_bma']:.4f}")
    for name in samplers:
        acc = metrics.PredictiveAccumulator(p.test[:, 1:])
        if name == "fiber":  # two ensembles: the walk's iterates and the map's draws
            from bench_fiber_lm import run_fiber

            rows = [(row, r, a) for row, (r, a) in run_fiber(p, s, score).items()]
        elif name == "mile":  # also its members alone: a deep ensemble of the fine-tuned starts
            deep = metrics.PredictiveAccumulator(p.test[:, 1:])
            r = run_mile(p, s, acc, deep)
            members = {"tuned_text": f"{s.members} AdamW members (MILE's)", "grads_tune": 0, "grads_sample": 0,
                       "grads_members": r["grads_members"], "forwards_tune": 0, "samples": s.members,
                       "seconds": 0.0, "seconds_members": r["seconds_members"]}
            rows = [(name, r, acc), ("deep-ensemble", members, deep)]
        else:
            rows = [(name, Chain(p, s, name, None, s.seed).run(s.budget, s.samples, acc), acc)]
        for row, r, a in rows:
            results[row] = {**r, **summary(a, p.n_in, p.test.shape[1] - 1)}
            results[row]["grads_per_sample"] = (r["grads_tune"] + r["grads_sample"] + r.get("grads_members", 0)) \
                / max(r["samples"], 1)
            # Paired with the start on the same windows; windows, not tokens, as the independent units.
            diff = torch.tensor(results[row]["window_nll"], dtype=torch.float64) - base
            results[row]["nll_minus_start"] = float(diff.mean())
            results[row]["nll_minus_start_se"] = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
            log(f"LM {row}: NLL {results[row]['nll_bma']:.4f} ({results[row]['nll_minus_start']:+.4f} ± "
                f"{results[row]['nll_minus_start_se']:.4f} vs start), ECE {results[row]['ece']:.4f}, epistemic "
                f"{results[row]['mean_epistemic']:.2e}, {r['seconds']:.0f} s")
    return results
