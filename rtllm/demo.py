"""`rtllm demo`: the main job on the built-in default, a few minutes on 2 CPU cores.

1. pretrain (or reuse) a tiny GPT-2 on the bundled Shakespeare plays (no download);
2. sample its weight posterior with the ray tracing sampler on the same text;
3. export the ensemble (safetensors samples that `from_pretrained` loads);
4. report each sample's held-out loss on a play the model never saw.
"""
from __future__ import annotations

import json
from pathlib import Path

from rtllm.config import SampleConfig
from rtllm.corpus import heldout_files, train_files
from rtllm.pretrain import ensure_pretrained
from rtllm.sampling import sample

DEMO_STEPS = 300
DEMO_BURN_IN = 100
DEMO_THIN = 20


def demo_config(work: Path, steps: int | None = None) -> SampleConfig:
    steps = steps or DEMO_STEPS
    burn_in = min(DEMO_BURN_IN, steps // 3)
    return SampleConfig(
        model=str(work / "model"), train=tuple(str(p) for p in train_files()),
        heldout=tuple(str(p) for p in heldout_files()), out=str(work / "ensemble"),
        steps=steps, burn_in=burn_in, thin=max(1, min(DEMO_THIN, (steps - burn_in) // 5)),
        batch_size=8, seq_len=128, log_every=10, seed=0)


def run_demo(work: Path, *, steps: int | None = None, overwrite: bool = False) -> Path:
    work = Path(work)
    print(f"rtllm demo: working in {work.resolve()}")
    model_dir = ensure_pretrained(work / "model")
    print(f"[1/3] starting checkpoint: {model_dir}")
    cfg = demo_config(work, steps)
    manifest = Path(cfg.out) / "ensemble.json"
    print(f"[2/3] sampling {cfg.steps} steps (burn-in {cfg.burn_in}, a sample every {cfg.thin}); "
          f"an earlier demo run is resumed or reused (--overwrite samples again)")
    sample(cfg, resume=not overwrite, overwrite=overwrite)
    entries = json.loads(manifest.read_text())["samples"]
    print(f"[3/3] ensemble of {len(entries)} samples in {cfg.out}")
    print("  sample  step  minibatch loss  held-out loss (nats/token)")
    for e in entries:
        print(f"  {e['index']:6d}  {e['step']:4d}  {e['loss']:14.4f}  {e['heldout_loss']:13.4f}")
    print(f"load one with: AutoModelForCausalLM.from_pretrained('{Path(cfg.out) / entries[0]['path']}')")
    return Path(cfg.out)
