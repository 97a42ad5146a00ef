"""`rtllm demo`: the main job on the built-in default, a few minutes on 2 CPU cores.

1. pretrain (or reuse) a tiny GPT-2 on the bundled Shakespeare plays (no download);
2. sample its weight posterior with the ray tracing sampler on the same text;
3. export the ensemble (safetensors samples that `from_pretrained` loads);
4. evaluate token-level uncertainty on a play the model never saw, with Python source as
   out-of-distribution text, against the starting checkpoint; write the reports.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from rtllm.lm.corpus import heldout_files, python_source_files, train_files

if TYPE_CHECKING:
    from rtllm.run.config import SampleConfig

DEMO_STEPS = 300
DEMO_BURN_IN = 100
DEMO_THIN = 20
DEMO_OOD_BYTES = 100_000  # of standard-library Python source: plenty for the OOD statistics


def demo_config(work: Path, steps: int | None = None) -> "SampleConfig":
    from rtllm.run.config import SampleConfig  # heavy (torch): not at import, the parser imports this

    steps = steps or DEMO_STEPS
    burn_in = min(DEMO_BURN_IN, steps // 3)
    return SampleConfig(
        model=str(work / "model"), train=tuple(str(p) for p in train_files()),
        heldout=tuple(str(p) for p in heldout_files()), out=str(work / "ensemble"),
        steps=steps, burn_in=burn_in, thin=max(1, min(DEMO_THIN, (steps - burn_in) // 5)),
        batch_size=8, seq_len=128, log_every=10, seed=0)


def run_demo(work: Path, *, steps: int | None = None, overwrite: bool = False) -> Path:
    from rtllm.evaluation.job import EvalJob, run_job
    from rtllm.lm.pretrain import ensure_pretrained
    from rtllm.run.sampling import sample

    work = Path(work)
    print(f"rtllm demo: working in {work.resolve()}")
    model_dir = ensure_pretrained(work / "model")
    print(f"[1/4] starting checkpoint: {model_dir}")
    cfg = demo_config(work, steps)
    manifest = Path(cfg.out) / "ensemble.json"
    print(f"[2/4] sampling {cfg.steps} steps (burn-in {cfg.burn_in}, a sample every {cfg.thin}); "
          f"an earlier demo run is resumed or reused (--overwrite samples again)")
    sample(cfg, resume=not overwrite, overwrite=overwrite)
    entries = json.loads(manifest.read_text())["samples"]
    print(f"[3/4] ensemble of {len(entries)} samples in {cfg.out}")
    print(f"      load one with AutoModelForCausalLM.from_pretrained('{Path(cfg.out) / entries[0]['path']}')")
    print("[4/4] evaluating on The Tempest (held out), Python source as out-of-distribution text")
    job = EvalJob(ensemble=cfg.out, data=tuple(map(str, heldout_files())), out=str(work / "evaluation"),
                  ood=tuple(map(str, python_source_files(DEMO_OOD_BYTES))), baseline=str(model_dir),
                  seq_len=cfg.seq_len)
    done = run_job(job, say=lambda m: print(f"      {m}"))
    paths, s = done.paths, done.summary
    print(f"      NLL (nats/token): ensemble {s['nll_bma']:.4f}, starting checkpoint {s['nll_baseline']:.4f}, "
          f"single samples {s['nll_samples_mean']:.4f}")
    print(f"      calibration: ECE {s['ece_top1']:.4f}, top-1 accuracy {s['accuracy_top1']:.3f}")
    print(f"      epistemic uncertainty: held-out {s['mean_epistemic']:.4f}, out-of-distribution "
          f"{s['mean_epistemic_ood']:.4f} nats; AUROC(OOD vs in) {s['auroc_ood_epistemic']:.3f}")
    out = (work / "evaluation").resolve()
    print(f"done. Everything is in {work.resolve()}:")
    print(f"      starting checkpoint  {Path(model_dir).resolve()}")
    print(f"      ensemble             {Path(cfg.out).resolve()} ({len(entries)} samples in samples/, "
          f"ensemble.json, the sampling log)")
    print(f"      evaluation           {out}: " + ", ".join(sorted(p.name for p in paths.values())))
    print(f"      open {out / 'tokens.html'} in a browser to see the text shaded by uncertainty")
    return work / "evaluation"
