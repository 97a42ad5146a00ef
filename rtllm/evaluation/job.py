"""One evaluation into an output directory, as `rtllm evaluate` and `rtllm demo` run it.

Checks `--out` before any computation, reuses a complete evaluation of the same inputs, else
evaluates (with and, when samples are masked, without the mask), adds the convergence
diagnostics, writes everything into a staging directory and publishes it (`publish`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from rtllm.evaluation import publish
from rtllm.lm.data import read_texts


@dataclass(frozen=True)
class EvalJob:
    """The inputs of `rtllm evaluate`; everything but `device`, `max_memory` and the offload
    settings can change the numbers and is part of the fingerprint (those change only how they
    are computed). offload: bytes of each sample on the device, the rest dispatched to host
    memory (offload_host bytes, None: what is free) and disk (offload_dir, None: a temporary
    directory); see rtllm.evaluation.offload. reference: the text the model was trained or
    sampled on, for the feature-distance OOD score (None: the run's training texts recorded in
    ensemble.json when they exist here; (): none; rtllm.evaluation.feature_distance)."""

    ensemble: str
    data: tuple[str, ...]
    out: str
    ood: tuple[str, ...] = ()
    baseline: str | None = None
    seq_len: int | None = None
    max_samples: int | None = None
    max_memory: int | None = None
    mask_heldout_above: float | None = None
    include_masked: bool = False
    device: str = "auto"
    encoding: str | None = None
    recompute: bool = False
    offload: int | None = None
    offload_host: int | None = None
    offload_dir: str | None = None
    reference: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("give at least one --data file or directory")
        if self.offload is None and (self.offload_host is not None or self.offload_dir is not None):
            raise ValueError("--offload-host and --offload-dir go with --offload (the bytes of each "
                             "sample to keep on the device)")


@dataclass
class EvalOutcome:
    summary: dict
    paths: dict[str, Path]
    reused: bool
    summary_unmasked: dict | None = None
    feature_missing: str | None = None  # why there is no feature-distance score, what to do
    diagnostics: dict | None = None
    diagnostics_missing: str | None = None  # why there are none (no sampling log)
    inputs: dict = field(default_factory=dict)


def run_job(job: EvalJob, say: Callable[[str], None] = lambda m: None) -> EvalOutcome:
    """Evaluate `job` into `job.out`, or reuse what is there; see the module docstring."""
    import json

    out = Path(job.out)
    publish.check_out_dir(out)
    texts, ood = _texts(job.data, job.encoding), _texts(job.ood, job.encoding)
    from rtllm.evaluation.feature_distance import ReferenceChoice, resolve_reference, skipped

    ref = resolve_reference(job.ensemble, job.reference)  # evaluate() resolves it alike
    try:
        reference = _texts(ref.paths or (), ref.text_encoding(job.encoding))
    except ValueError as err:
        ref, reference = ReferenceChoice(None, "missing", skipped(ref, err)), {}
    options = {"seq_len": job.seq_len, "max_samples": job.max_samples, "include_masked": job.include_masked,
               "mask_heldout_above": job.mask_heldout_above, "encoding": job.encoding}
    digest, inputs = publish.fingerprint(Path(job.ensemble), texts, ood,
                                         Path(job.baseline) if job.baseline else None, options,
                                         reference=reference)
    inputs = {"ensemble": str(Path(job.ensemble).resolve()), "model": _model_of(Path(job.ensemble)),
              "baseline_dir": str(Path(job.baseline).resolve()) if job.baseline else None, **inputs}
    done = None if job.recompute else publish.completed(out, digest)
    if done is not None:
        say(f"already complete: the evaluation in {out} was made from the same ensemble, texts and "
            f"options; nothing to do (--recompute evaluates again)")
        read = lambda name: json.loads((out / name).read_text()) if (out / name).is_file() else None  # noqa: E731
        return EvalOutcome(summary=read("summary.json"), paths={p.stem: p for p in done}, reused=True,
                           summary_unmasked=read("summary_unmasked.json"), diagnostics=read("diagnostics.json"),
                           inputs=inputs, feature_missing=ref.note)
    created_out = not out.exists()
    staging = publish.begin(out)
    try:
        outcome = _evaluate_into(job, staging, inputs, say)
        outcome.paths = publish.publish(staging, out, digest, inputs)
    except BaseException:
        publish.discard(staging, created_out=created_out)
        raise
    return outcome


def _model_of(ensemble_dir: Path) -> str | None:
    """The model the ensemble was sampled from, as its run recorded it (for the reports)."""
    import json

    try:
        config = json.loads((ensemble_dir / "ensemble.json").read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return None
    model = config.get("model") if isinstance(config, dict) else None
    return model if isinstance(model, str) else None  # as the run was given it


def _texts(paths: Sequence[str], encoding: str | None = None) -> dict[str, str]:
    return {str(p.resolve()): text for p, text in read_texts(paths, encoding)} if paths else {}


def _evaluate_into(job: EvalJob, staging: Path, inputs: dict, say: Callable[[str], None]) -> EvalOutcome:
    import tempfile

    if job.offload is None:
        return _evaluate_offloaded(job, staging, inputs, say, None, None)
    from rtllm.evaluation.offload import offload_memory
    from rtllm.lm.model_io import resolve_device

    budget = offload_memory(resolve_device(job.device), job.offload, job.offload_host)
    if job.offload_dir is not None:
        return _evaluate_offloaded(job, staging, inputs, say, budget, job.offload_dir)
    with tempfile.TemporaryDirectory(prefix="rtllm-offload-") as where:
        return _evaluate_offloaded(job, staging, inputs, say, budget, where)


def _evaluate_offloaded(job: EvalJob, staging: Path, inputs: dict, say: Callable[[str], None],
                        offload: dict | None, offload_dir: str | None) -> EvalOutcome:
    from rtllm.evaluation.chain_split import evaluate_by_chain
    from rtllm.evaluation.diagnostics import diagnose, stationarity
    from rtllm.evaluation.streaming import evaluate, write_evaluation
    from rtllm.store.manifest import atomic_write_json

    def run(masking: bool, ensemble: str | Path = job.ensemble, features: bool = False):
        # The feature distance once, for the headline summary (a chain's or the unmasked
        # summary would repeat the same model's features or those of another first sample).
        return evaluate(ensemble, list(job.data), ood_texts=list(job.ood) or None, baseline=job.baseline,
                        reference=("manifest" if job.reference is None else list(job.reference)) if features else None,
                        seq_len=job.seq_len, max_samples=job.max_samples, max_memory=job.max_memory,
                        mask="manifest" if masking else None,
                        mask_heldout_above=job.mask_heldout_above if masking else None,
                        device=job.device, encoding=job.encoding, progress=say,
                        offload=offload, offload_dir=offload_dir)

    result = run(masking=not job.include_masked, features=True)
    try:  # the chains' stationarity verdict, the same one `rtllm sample` prints at its end
        result.summary["stationarity"] = stationarity(job.ensemble).to_json()
    except (ValueError, FileNotFoundError) as err:  # no sampling log next to the samples
        say(f"no stationarity verdict ({err})")
    chains = evaluate_by_chain(job.ensemble, result, lambda d: run(not job.include_masked, d))
    if chains is not None:  # a multi-start ensemble: what the starts disagree on, apart
        result.summary["chains"] = chains
    say("writing tokens.jsonl, summary.json and the reports")
    write_evaluation(result, staging, context=inputs)
    outcome = EvalOutcome(summary=result.summary, paths={}, reused=False, inputs=inputs,
                          feature_missing=result.feature_note)
    if result.summary["n_samples_masked"]:
        # Masked samples are reported, and the headline numbers shown with them too.
        say(f"again with the {result.summary['n_samples_masked']} masked samples, for summary_unmasked.json")
        outcome.summary_unmasked = run(masking=False).summary
        atomic_write_json(staging / "summary_unmasked.json", outcome.summary_unmasked)
    try:
        outcome.diagnostics = diagnose(job.ensemble)
    except (ValueError, FileNotFoundError) as err:  # no sampling log next to the samples
        outcome.diagnostics_missing = str(err)
    else:
        atomic_write_json(staging / "diagnostics.json", outcome.diagnostics)
    return outcome
