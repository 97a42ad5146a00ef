"""`rtllm demo`: the main job on the built-in default, a few minutes on 2 CPU cores.

1. pretrain (or reuse) a tiny GPT-2 on the bundled Shakespeare plays (no download);
2. sample its weight posterior with the ray tracing sampler on the same text;
3. export the ensemble (safetensors samples that `from_pretrained` loads);
4. evaluate token-level uncertainty on a play the model never saw, with Python source as
   out-of-distribution text, against the starting checkpoint; write the reports.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rtllm.lm.corpus import heldout_files, python_source_files, train_files

if TYPE_CHECKING:
    from rtllm.run.config import SampleConfig

DEMO_STEPS = 300
DEMO_BURN_IN = 100
DEMO_THIN = 20
DEMO_OOD_BYTES = 100_000  # of standard-library Python source: plenty for the OOD statistics


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: the pretraining, the sampling run, and the text evaluated.

    `rtllm demo` runs DEMO; the default test suite runs SMALL_DEMO, the same pipeline on less
    text from the suite's shared tiny model (tests/evaluation/test_quality.py), and the slow
    suite the whole DEMO.
    """

    pretrain: tuple[tuple[str, int], ...] = ()  # rtllm.lm.pretrain.pretrain keywords; () its own sizes
    steps: int = DEMO_STEPS
    burn_in: int = DEMO_BURN_IN
    thin: int = DEMO_THIN
    ood_bytes: int = DEMO_OOD_BYTES
    heldout_bytes: int | None = None  # None: the whole held-out play
    seq_len: int = 128  # tokens per training sequence and evaluation window

    def __post_init__(self) -> None:
        for name in ("steps", "thin", "ood_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoSize.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.burn_in < self.steps:
            raise ValueError(f"DemoSize.burn_in must be in [0, steps), got {self.burn_in}")


DEMO = DemoSize()
# For the test suite, started from its shared trained tiny GPT-2 (64-token context): measured under
# load (2026-12-03) BMA 3.75 vs start 4.05 nats, epistemic 0.075 OOD vs 0.052, AUROC 0.97 on 40 KB.
SMALL_DEMO = DemoSize(steps=150, burn_in=50, thin=20, ood_bytes=20_000, heldout_bytes=20_000, seq_len=64)
DEMO_TIMES = "demo_times.json"  # seconds per phase of the last run (scripts/bench_demo.py reads it)


class PhaseClock:
    """Wall seconds per phase of the demo; a reused phase shows as (nearly) 0 s."""

    def __init__(self) -> None:
        self._last = self._start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase], self._last = round(now - self._last, 1), now

    def describe(self) -> str:
        total = time.perf_counter() - self._start
        return ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()) + f"; total {total:.0f} s"

    def save(self, path: Path, **extra) -> None:
        path.write_text(json.dumps({**self.seconds, **extra}, indent=2) + "\n")


def demo_config(work: Path, steps: int | None = None, size: DemoSize = DEMO) -> "SampleConfig":
    from rtllm.run.config import SampleConfig  # heavy (torch): not at import, the parser imports this

    steps = steps or size.steps
    burn_in = min(size.burn_in, steps // 3)
    return SampleConfig(
        model=str(work / "model"), train=tuple(str(p) for p in train_files()),
        heldout=tuple(str(p) for p in heldout_files()), out=str(work / "ensemble"),
        steps=steps, burn_in=burn_in, thin=max(1, min(size.thin, (steps - burn_in) // 5)),
        batch_size=8, seq_len=size.seq_len, log_every=10, seed=0)


def _heldout_texts(work: Path, size: DemoSize) -> list[Path]:
    """The held-out play, or its first `heldout_bytes` (cut at a line end) for a small demo."""
    if size.heldout_bytes is None:
        return list(heldout_files())
    text = heldout_files()[0].read_text(encoding="utf-8")[: size.heldout_bytes]
    path = work / "texts" / "heldout.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    cut = text[: text.rfind("\n") + 1] or text
    if not path.is_file() or path.read_text(encoding="utf-8") != cut:
        path.write_text(cut, encoding="utf-8")
    return [path]


def run_demo(work: Path, *, steps: int | None = None, overwrite: bool = False, size: DemoSize = DEMO,
             start: Path | None = None) -> Path:
    """The demo in `work`; `start`: a trained model directory to sample from instead of pretraining
    one (the test suite passes its shared tiny model)."""
    from rtllm.evaluation.job import EvalJob, run_job
    from rtllm.lm.pretrain import ensure_pretrained, is_complete
    from rtllm.run.sampling import sample

    work = Path(work)
    print(f"rtllm demo: working in {work.resolve()}")
    clock = PhaseClock()
    reused = is_complete(work / "model")
    if start is not None and not reused:
        shutil.copytree(start, work / "model")
    model_dir = ensure_pretrained(work / "model", **dict(size.pretrain))
    clock.lap("pretrain")
    origin = " (already pretrained: reused)" if reused else f" (a copy of {start})" if start else ""
    print(f"[1/4] starting checkpoint: {model_dir}{origin}")
    cfg = demo_config(work, steps, size)
    manifest = Path(cfg.out) / "ensemble.json"
    print(f"[2/4] sampling {cfg.steps} steps (burn-in {cfg.burn_in}, a sample every {cfg.thin}); "
          f"an earlier demo run is resumed or reused (--overwrite samples again)")
    sample(cfg, resume=not overwrite, overwrite=overwrite)
    clock.lap("sample")
    entries = json.loads(manifest.read_text())["samples"]
    print(f"[3/4] ensemble of {len(entries)} samples in {cfg.out}")
    print(f"      load one with AutoModelForCausalLM.from_pretrained('{Path(cfg.out) / entries[0]['path']}')")
    print("[4/4] evaluating on The Tempest (held out), Python source as out-of-distribution text")
    job = EvalJob(ensemble=cfg.out, data=tuple(map(str, _heldout_texts(work, size))), out=str(work / "evaluation"),
                  ood=tuple(map(str, python_source_files(size.ood_bytes))), baseline=str(model_dir),
                  seq_len=cfg.seq_len)
    done = run_job(job, say=lambda m: print(f"      {m}"))
    clock.lap("evaluate")
    clock.save(work / DEMO_TIMES, summary=done.summary)
    paths, s = done.paths, done.summary
    print(f"      NLL (nats/token): ensemble {s['nll_bma']:.4f}, starting checkpoint {s['nll_baseline']:.4f}, "
          f"single samples {s['nll_samples_mean']:.4f}")
    print(f"      calibration: ECE {s['ece_top1']:.4f}, top-1 accuracy {s['accuracy_top1']:.3f}")
    print(f"      epistemic uncertainty: held-out {s['mean_epistemic']:.4f}, out-of-distribution "
          f"{s['mean_epistemic_ood']:.4f} nats; AUROC(OOD vs in) {s['auroc_ood_epistemic']:.3f}")
    if "auroc_ood_feature" in s:  # the starting checkpoint's features against the training text's
        print(f"      feature distance from the training text: AUROC(OOD vs in) {s['auroc_ood_feature']:.3f}")
    if s.get("epistemic_note"):
        print(f"      note: {s['epistemic_note']}")
    out = (work / "evaluation").resolve()
    print(f"done. Everything is in {work.resolve()}:")
    print(f"      starting checkpoint  {Path(model_dir).resolve()}")
    print(f"      ensemble             {Path(cfg.out).resolve()} ({len(entries)} samples in samples/, "
          f"ensemble.json, the sampling log)")
    print(f"      evaluation           {out}: " + ", ".join(sorted(p.name for p in paths.values())))
    print(f"      open {out / 'tokens.html'} in a browser to see the text shaded by uncertainty")
    print(f"      times of this run: {clock.describe()} ({work / DEMO_TIMES})")
    return work / "evaluation"
