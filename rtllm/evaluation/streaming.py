"""`rtllm evaluate`: per-token predictive uncertainty of an exported ensemble, streamed.

Texts are tokenized with the ensemble's tokenizer and cut into windows of `seq_len` predicted
tokens (`rtllm.lm.data.pack`: T + 1 tokens per window, consecutive windows overlap by one, so
every next-token transition is scored once). The outer loop runs over chunks of windows sized
to a memory budget, the inner loop over samples, each copied into one model built once: memory
does not grow with the number of samples, and per token only what the metrics need is kept
(`rtllm.evaluation.metrics.PredictiveAccumulator`). Chunks visit the samples alternately forwards and
backwards, so the sample loaded last in a chunk serves first in the next and is not re-read.

Memory budget (`max_memory`, default 1 GiB, on the evaluation device): 7/8 of it holds a
chunk's running BMA mean `[tokens, vocab]` fp32 plus one sample's logits `[tokens, vocab]`
(at least 4 bytes per element), i.e. `vocab * (4 + logit bytes) + 64` bytes per token; the
remaining 1/8 bounds the fp64 row blocks of the reductions. Not counted: the model's weights
(on CUDA twice: the next sample is staged on the device while the current one runs), the
forward's activations, and the starting checkpoint when `baseline` is given (evaluated in a
pass of its own before the samples, then freed). The feature-distance score
(rtllm.evaluation.feature_distance) adds one forward over the reference windows, of that model
(whose NLL pass also gives the evaluated windows' features), or of the first sample (which then
runs over the evaluated windows once more).
"""
from __future__ import annotations

import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from rtllm.evaluation import feature_distance, metrics
from rtllm.evaluation.report_summary import epistemic_note
from rtllm.lm.data import context_length, pack, read_texts, tokenize_texts
from rtllm.evaluation.offload import (FORWARD_WINDOWS, OffloadedLoader, PieceSize, dispatch_offloaded,
                                      forward_in_pieces)
from rtllm.store.ensemble import Ensemble
from rtllm.evaluation.metrics import TOKEN_TABLE_KEYS, TokenTable, write_token_table  # noqa: F401 (API)
from rtllm.lm.model_io import load_tokenizer, resolve_device
from rtllm.state.progress import Progress

DEFAULT_MAX_MEMORY = 1 << 30
DEFAULT_MAX_SEQ_LEN = 1024  # cap of the default window: attention cost grows with T^2
# Tokenized by both tokenizers when a baseline is given: ASCII, digits, whitespace, non-ASCII.
PROBE_TEXT = "The quick brown fox, 1234 times.\n\tNaïve café: ¿qué? 東京 🙂 <|endoftext|>"


@dataclass
class EvalResult:
    table: TokenTable
    summary: dict
    samples: list[dict]  # manifest entries of the samples used, each with its normalized "weight"
    seq_len: int
    first_tokens: dict | None = None  # {"in": text, "ood": text}: the tokens nothing predicts
    feature_note: str | None = None  # why there is no feature-distance score, and what to do


def evaluate(ensemble_dir: str | Path, texts: Sequence[str | Path], *,
             ood_texts: Sequence[str | Path] | None = None, baseline: str | Path | None = None,
             seq_len: int | None = None, max_samples: int | None = None,
             max_memory: int | None = None,
             sample_weights: Mapping[int, float] | Sequence[float] | None = None,
             mask: None | str | Callable[[dict], bool] = None,
             mask_heldout_above: float | None = None, device: str | torch.device = "cpu",
             progress: Callable[[str], None] | None = None,
             encoding: str | None = None, offload: dict | None = None,
             offload_dir: str | Path | None = None, reference="manifest") -> EvalResult:
    """Per-token BMA metrics of the ensemble in `ensemble_dir` on `texts` (files/directories).

    `ood_texts`: out-of-distribution texts, scored too (is_ood) and used for the OOD AUROCs.
    `baseline`: the starting checkpoint's directory, for nll_baseline. `seq_len`: predicted
    tokens per window (default: the model's context, capped at 1024 and by the texts).
    `sample_weights`: by sample index (mapping) or aligned with the manifest entries
    (sequence); normalized over the samples used, weight 0 drops a sample. `mask`: None,
    "manifest" (the run's masked flags) or a function entry -> True to drop;
    `mask_heldout_above` additionally drops samples whose manifest heldout_loss exceeds it.
    `max_samples`: that many of the remaining samples, evenly spaced in manifest order.
    `encoding`: of the text files (default: UTF-8, strictly).
    `offload`: samples larger than the device. accelerate's max_memory for one sample (e.g.
    {0: "2GiB", "cpu": "30GiB"}; rtllm.evaluation.offload.offload_memory): each sample (and
    the baseline) is built in host memory and dispatched, the layers that do not fit on the
    device in host memory or, past that, on disk in `offload_dir`; one sample at a time.
    """
    say = progress or (lambda message: None)
    device = resolve_device(device)
    budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 1:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    budget = int(budget)
    ensemble = Ensemble(ensemble_dir, verify=True)
    if len(ensemble) == 0:
        raise ValueError(f"{ensemble.out_dir / 'ensemble.json'} lists no samples; evaluate a "
                         f"directory a sampling run wrote samples to")
    used, n_masked = select_samples(ensemble.entries, mask=mask, max_samples=max_samples,
                                    mask_heldout_above=mask_heldout_above,
                                    sample_weights=sample_weights)
    tokenizer = load_ensemble_tokenizer(ensemble.out_dir)
    from transformers import AutoConfig  # heavy import, only when a model is built

    config = AutoConfig.from_pretrained(ensemble.path(used[0]["index"]), local_files_only=True)
    vocab, dtype = config.vocab_size, _compute_dtype(getattr(config, "dtype", None), device)
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer in {ensemble.out_dir} has {len(tokenizer)} tokens but the "
                         f"model's vocabulary has {vocab}: the tokenizer files do not belong to "
                         f"these samples; copy the starting checkpoint's tokenizer there")
    # A baseline that does not load (or does not match) is refused before any work starts.
    base_model = None if baseline is None else load_baseline(baseline, tokenizer, ensemble.out_dir)
    windows, is_ood_w, seq_len = make_windows(tokenizer, texts, ood_texts, seq_len,
                                              context_length(config), encoding=encoding)
    ref, ref_windows, feature_note = feature_distance.prepare(ensemble.out_dir, reference, tokenizer,
                                                              seq_len, encoding)
    features: dict = {}
    logit_bytes = max(4, torch.finfo(dtype).bits // 8)
    per_chunk = windows_per_chunk(budget, seq_len, vocab, logit_bytes)
    block_bytes = max(1, budget // 8)
    chunks = [slice(s, s + per_chunk) for s in range(0, len(windows), per_chunk)]
    say(f"{len(used)} samples ({n_masked} masked), {len(windows)} windows of {seq_len} tokens, "
        f"{len(chunks)} chunk(s) of <= {per_chunk} windows")

    nll_base = np.full(windows.shape[0] * seq_len, np.nan)
    if base_model is not None:  # first, so that its model is freed before the samples' is built
        say(f"the starting checkpoint {baseline} first, then the samples")
        if offload is not None:  # dispatched as the samples are
            base_model = dispatch_offloaded(base_model.to(dtype).eval(), offload,
                                            None if offload_dir is None else Path(offload_dir) / "baseline")
        # With a reference, the NLL pass also yields the evaluated windows' features (a hook).
        capture = feature_distance.CapturedFeatures(base_model) if ref_windows is not None else None
        nll_base = baseline_nll(base_model, windows, chunks, device, block_bytes,
                                show_progress=progress is not None)
        if capture is not None:
            evaluated = capture.close()
            reference_features = feature_distance.window_features(base_model, ref_windows, device)
            features = {**feature_distance.feature_summary(reference_features, evaluated, is_ood_w),
                        "feature_model": "baseline"}
        base_model = None
        if offload is not None and offload_dir is not None:
            shutil.rmtree(Path(offload_dir) / "baseline", ignore_errors=True)
    # Chunk c visits the samples forwards (c even) or backwards: the boundary sample stays loaded.
    orders = [used if c % 2 == 0 else used[::-1] for c in range(len(chunks))]
    plan = [e["index"] for order in orders for e in order]
    plan = [i for prev, i in zip([used[0]["index"]] + plan, plan) if i != prev]
    if offload is None:
        model = ensemble.load_model(used[0]["index"], dtype=dtype, local_files_only=True)
        loader = SampleLoader(ensemble, plan, model.to(device).eval(), device, loaded=used[0]["index"])
    else:
        loader = OffloadedLoader(ensemble, plan, dtype, offload, offload_dir, loaded=used[0]["index"])
    if ref_windows is not None and not features:  # the first sample's features, before it is replaced
        features = {**feature_distance.score(loader.model, windows, ref_windows, is_ood_w, device),
                    "feature_model": f"sample {used[0]['index']}"}
    parts, pieces = [], PieceSize(FORWARD_WINDOWS)
    bar = Progress(len(chunks) * len(used), "evaluate", unit="sample pass", enabled=progress is not None)
    try:
        with torch.inference_mode():
            for c, (rows, order) in enumerate(zip(chunks, orders)):
                seqs = windows[rows].to(device)
                acc = metrics.PredictiveAccumulator(seqs[:, 1:], block_bytes=block_bytes)
                for entry in order:
                    if entry["index"] != loader.loaded:
                        loader.load_next()
                    # Forward in cache-sized pieces: one pass over a whole chunk runs its
                    # elementwise layers over gigabytes of activations (~2x slower on CPU).
                    # Out of memory: the rest in smaller pieces (offload.forward_in_pieces).
                    forward_in_pieces(
                        lambda x: loader.model(input_ids=x[:, :-1], use_cache=False).logits, seqs,
                        lambda logits, w, acc=acc: acc.add_block(logits.reshape(-1, logits.shape[-1]),
                                                                 entry["weight"], w * seq_len), pieces)
                    acc.close_sample(entry["weight"])
                    bar.update(1)
                parts.append({k: v.cpu().numpy() for k, v in acc.finalize().items()})
                del acc
                say(f"chunk {c + 1}/{len(chunks)} done")
    finally:
        bar.close()
        loader.close()

    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    n_w = windows.shape[0]
    token_ids = windows[:, 1:].reshape(-1).numpy()
    table: TokenTable = {
        "window": np.repeat(np.arange(n_w), seq_len),
        "position": np.tile(np.arange(1, seq_len + 1), n_w),
        "token_id": token_ids.astype(np.int64),
        "token": decode_tokens(tokenizer, token_ids),
        **{k: cols[k] for k in ("nll_bma", "p_observed", "entropy_total", "aleatoric",
                                "epistemic", "nll_samples_mean", "confidence")},
        "correct": cols["correct"].astype(bool), "nll_baseline": nll_base,
        "is_ood": np.repeat(is_ood_w, seq_len),
    }
    summary = metrics.summarize(table, cols["brier"], has_baseline=baseline is not None)
    summary.update({"n_samples_used": len(used), "n_samples_masked": n_masked,
                    "seq_len": seq_len, "n_windows": int((~is_ood_w).sum()),
                    "n_windows_ood": int(is_ood_w.sum())})
    if features:
        summary.update(features, feature_reference=[Path(p).name for p in ref.paths])
    if (note := epistemic_note(summary)) is not None:
        summary["epistemic_note"] = note
    first_ood = int(np.argmax(is_ood_w)) if is_ood_w.any() else None
    first = {"in": tokenizer.decode([int(windows[0, 0])])}
    if first_ood is not None:
        first["ood"] = tokenizer.decode([int(windows[first_ood, 0])])
    return EvalResult(table=table, summary=summary, samples=used, seq_len=seq_len, first_tokens=first,
                      feature_note=feature_note)


# -- inputs -----------------------------------------------------------------------------------
def _compute_dtype(stored, device: torch.device) -> torch.dtype:
    """The stored dtype (a config's `dtype`: torch dtype, name or None = fp32), except half
    precision on CPU, where matmuls are slow and no more accurate: fp32 there."""
    if isinstance(stored, str):
        stored = getattr(torch, stored.removeprefix("torch."), None)
    if not isinstance(stored, torch.dtype) or not stored.is_floating_point:
        return torch.float32
    if device.type == "cpu" and stored in (torch.float16, torch.bfloat16):
        return torch.float32
    return stored


def select_samples(entries: list[dict], *, mask=None, mask_heldout_above: float | None = None,
                   max_samples: int | None = None, sample_weights=None
                   ) -> tuple[list[dict], int]:
    """`(used entries with normalized "weight", number masked)`, in manifest order."""
    if mask is None:
        masked = [False] * len(entries)
    elif isinstance(mask, str) and mask == "manifest":
        masked = [bool(e["masked"]) for e in entries]
    elif callable(mask):
        masked = [bool(mask(dict(e))) for e in entries]
    else:
        raise ValueError(f"mask must be None, 'manifest' or a function entry -> bool, got {mask!r}")
    if mask_heldout_above is not None:
        if not math.isfinite(mask_heldout_above):
            raise ValueError(f"mask_heldout_above must be finite, got {mask_heldout_above!r}")
        # A sample without a recorded held-out loss cannot be judged by it and is kept.
        masked = [m or (e["heldout_loss"] is not None and e["heldout_loss"] > mask_heldout_above)
                  for m, e in zip(masked, entries)]
    weights = _weights(entries, sample_weights)
    n_masked = sum(masked)
    kept = [dict(e, weight=w) for e, m, w in zip(entries, masked, weights) if not m and w > 0]
    if not any(not m for m in masked):
        raise ValueError(f"all {len(entries)} samples are masked; nothing to evaluate (pass "
                         f"mask=None / --include-masked, or a higher --mask-heldout-above)")
    if not kept:
        raise ValueError("every unmasked sample has weight 0; give some a positive weight")
    if max_samples is not None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples must be a positive int, got {max_samples!r}")
        if max_samples < len(kept):  # evenly spaced: every chain and the whole trajectory
            picks = np.linspace(0, len(kept) - 1, max_samples).round().astype(int)
            kept = [kept[i] for i in picks]
    total = sum(e["weight"] for e in kept)
    for e in kept:
        e["weight"] /= total
    return kept, n_masked


def _weights(entries: list[dict], sample_weights) -> list[float]:
    if sample_weights is None:
        return [1.0] * len(entries)
    if isinstance(sample_weights, Mapping):
        unknown = set(sample_weights) - {e["index"] for e in entries}
        if unknown:
            raise ValueError(f"sample_weights names sample indices {sorted(unknown)} that the "
                             f"manifest does not list")
        missing = [e["index"] for e in entries if e["index"] not in sample_weights]
        if missing:
            raise ValueError(f"sample_weights has no weight for samples {missing}; give every "
                             f"sample one (0 drops it)")
        weights = [float(sample_weights[e["index"]]) for e in entries]
    else:
        weights = [float(w) for w in sample_weights]
        if len(weights) != len(entries):
            raise ValueError(f"sample_weights has {len(weights)} values but the manifest lists "
                             f"{len(entries)} samples; pass one per manifest entry or a mapping "
                             f"sample index -> weight")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"sample weights must be finite and >= 0, got {weights}")
    return weights


def load_ensemble_tokenizer(path: Path):
    return load_tokenizer(path, f"rtllm.store.writer.copy_tokenizer(model_dir, {str(path)!r})")


def check_same_tokenizer(ours, theirs, our_dir: Path, their_dir: Path) -> None:
    """ValueError unless both tokenizers have the same size and tokenize PROBE_TEXT alike."""
    if len(ours) != len(theirs):
        raise ValueError(f"the baseline {their_dir} has a vocabulary of {len(theirs)} tokens but the "
                         f"ensemble {our_dir} has {len(ours)}: token NLLs would not be comparable; "
                         f"pass the checkpoint the ensemble was sampled from")
    a = ours(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    b = theirs(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if a != b:
        raise ValueError(f"the baseline {their_dir} tokenizes {PROBE_TEXT!r} differently from the "
                         f"ensemble {our_dir} ({b[:8]}... vs {a[:8]}...); pass the checkpoint "
                         f"the ensemble was sampled from")


def _stream(tokenizer, paths, what: str, encoding: str | None = None) -> torch.Tensor:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    texts = read_texts(paths, encoding)
    stream, _ = tokenize_texts(texts, tokenizer)
    if len(stream) < 2:
        names = ", ".join(str(p) for p, _ in texts)
        raise ValueError(f"{what} ({names}) has {len(stream)} token(s); scoring needs at least 2 "
                         f"(a context and a next token): pass more text")
    return stream


def make_windows(tokenizer, texts, ood_texts, seq_len: int | None, context: int, *,
                 encoding: str | None = None) -> tuple[torch.Tensor, np.ndarray, int]:
    """`(windows [W, T + 1], is_ood per window, T)`: in-distribution windows, then OOD ones."""
    streams = [_stream(tokenizer, texts, "the evaluation text", encoding)]
    if ood_texts:
        streams.append(_stream(tokenizer, ood_texts, "the OOD text", encoding))
    if seq_len is None:
        seq_len = min(context, DEFAULT_MAX_SEQ_LEN, *(len(s) - 1 for s in streams))
    elif isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= context:
        raise ValueError(f"seq_len must be an int in [1, {context}] (the model's context length), "
                         f"got {seq_len!r}")
    packed = [pack(s, seq_len, what=what) for s, what in
              zip(streams, ("the evaluation text", "the OOD text"))]
    is_ood = np.concatenate([np.full(len(p), i == 1) for i, p in enumerate(packed)])
    return torch.cat(packed), is_ood, seq_len


def windows_per_chunk(max_memory: int, seq_len: int, vocab: int, logit_bytes: int = 4) -> int:
    """Windows per chunk: 7/8 of `max_memory` over `seq_len * (vocab * (4 + logit_bytes) + 64)`
    (running fp32 BMA mean + one sample's logits + per-token scalars)."""
    per_window = seq_len * (vocab * (4 + logit_bytes) + 64)
    n = (max_memory * 7 // 8) // per_window
    if n < 1:
        raise ValueError(f"max_memory {max_memory} bytes is below one window's "
                         f"{math.ceil(per_window * 8 / 7)} (seq_len {seq_len}, vocabulary "
                         f"{vocab}); pass a larger max_memory or a smaller seq_len")
    return int(n)


def decode_tokens(tokenizer, token_ids: np.ndarray) -> np.ndarray:
    """The decoded text of each token (a lone byte of a multi-byte character decodes as U+FFFD)."""
    uniq, inverse = np.unique(token_ids, return_inverse=True)
    texts = tokenizer.batch_decode([[int(t)] for t in uniq])
    return np.array(texts, dtype=object)[inverse]


# -- weights ----------------------------------------------------------------------------------
class SampleLoader:
    """Copies the samples' weights into one model in the order `plan`, reading the next one in
    a background thread while the current one is evaluated; on CUDA that thread also stages it
    on the device on a side stream, and the copy into the model waits on its event only."""

    def __init__(self, ensemble: Ensemble, plan: list[int], model, device: torch.device, *,
                 loaded: int | None = None) -> None:
        self.ensemble, self.plan, self.model, self.device = ensemble, plan, model, device
        self.loaded = loaded  # the sample the model holds now
        self._pos = 0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        aliases: dict[int, list[str]] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            aliases.setdefault(id(tensor), []).append(name)
        self._aliases = {n: names for names in aliases.values() for n in names}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rtllm-eval-load")
        self._next = self._pool.submit(self._read, plan[0]) if plan else None

    def _read(self, index: int):
        state = self.ensemble.state_dict(index)
        if self._stream is None:
            return state, None
        with torch.cuda.stream(self._stream):
            state = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in state.items()}
            event = torch.cuda.Event()
            event.record(self._stream)
        return state, event

    def load_next(self) -> int:
        index = self.plan[self._pos]
        state, event = self._next.result()
        self._pos += 1
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in state.values():  # freed tensors must not be reused before the copy ran
                t.record_stream(current)
        load_weights(self.model, state, self.ensemble.path(index), self._aliases)
        del state
        self.loaded = index
        self._next = (self._pool.submit(self._read, self.plan[self._pos])
                      if self._pos < len(self.plan) else None)
        return index

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def load_weights(model, state: dict, where: Path, aliases: dict[str, list[str]]) -> None:
    """`load_state_dict(strict=False)`, allowing missing keys only for tied weights (GPT-2's
    lm_head.weight is transformer.wte.weight; save_pretrained stores it once)."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys
               if not any(a in state for a in aliases.get(k, ()) if a != k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"the weights in {where} do not fit the model built from the first "
                         f"sample's config (missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}); all samples of an ensemble must share "
                         f"one architecture")


def load_baseline(baseline: str | Path, tokenizer, ensemble_dir: Path):
    """The starting checkpoint's model on the CPU, checked to share the ensemble's tokenizer."""
    from rtllm.lm.model_io import load_model_and_tokenizer

    model, theirs = load_model_and_tokenizer(baseline, device="cpu")
    check_same_tokenizer(tokenizer, theirs, ensemble_dir, Path(baseline))
    return model


def baseline_nll(model, windows: torch.Tensor, chunks: list[slice], device: torch.device,
                 block_bytes: int, show_progress: bool = False) -> np.ndarray:
    """Per-token NLL of the starting checkpoint on all windows (its own pass); a dispatched
    model (hf_device_map) stays where accelerate placed it."""
    if getattr(model, "hf_device_map", None) is None:
        model = model.to(device, _compute_dtype(model.dtype, device)).eval()
    out = []
    with torch.inference_mode(), Progress(len(chunks), "baseline", unit="chunk", enabled=show_progress) as bar:
        for rows in chunks:
            seqs = windows[rows].to(device)
            logits = model(input_ids=seqs[:, :-1], use_cache=False).logits
            out.append(metrics.token_nll(logits, seqs[:, 1:], block_bytes=block_bytes).cpu())
            del logits
            bar.update(1)
    return torch.cat(out).numpy()


def write_evaluation(result: "EvalResult", out: Path, context: dict | None = None) -> dict[str, Path]:
    """summary.json, tokens.jsonl and the reports (PNG plots, shaded-token HTML) into `out`;
    `context` (ensemble, texts, ...: `rtllm.evaluation.job`) names the inputs in the reports."""
    from rtllm.evaluation.report import write_reports
    from rtllm.store.writer import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "summary.json", result.summary)
    write_token_table(result.table, out / "tokens.jsonl")
    return {"summary": out / "summary.json", "token_table": out / "tokens.jsonl",
            **{f"report_{k}": v
               for k, v in write_reports(result.table, result.summary, out,
                                         context={**(context or {}), "first_tokens": result.first_tokens}).items()}}
