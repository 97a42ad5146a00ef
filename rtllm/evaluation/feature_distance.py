"""A distance-aware OOD score for `rtllm evaluate`: how far each window sits from the text the
model was trained or sampled on, in one model's features.

Features: per window, the mean over its positions of the model's final hidden state (after
the last layer norm, `model.base_model(...).last_hidden_state`; averaged in fp32, fit and
scored in fp64). One model is used:
the `--baseline` checkpoint when given, else the first sample evaluated. The reference windows
are the reference text (`--reference`; by default the run's training texts recorded in
ensemble.json) tokenized and cut like the evaluated texts, at most MAX_REFERENCE_WINDOWS of
them, evenly spaced. Per feature dimension their mean and variance are fit (the variance
floored at VARIANCE_FLOOR times the mean variance, so a dimension that barely varies on the
reference does not dominate), and every evaluated window is scored by the mean squared
standardized distance: a diagonal Mahalanobis distance divided by the dimension, ~1 for
windows like the reference's, larger for windows unlike them (Mukhoti et al. 2021, "Deep
Deterministic Uncertainty", fit one Gaussian per class; a language model's next-token classes
are too many and the window mean is the natural unit here).

Why it is there (docs/uncertainty.md): the samples' disagreement (mutual information) follows
how often the model read the input tokens, so OOD text made of the training text's words gets
the training text's spread; the distance of the features does not depend on the spread.
It is the features of one model, not the posterior's: it says how new the text is to the
model, not how much the samples disagree about it. Cost: one forward of one model over the
reference windows, and over the evaluated windows unless the baseline's NLL pass gives their
features (`CapturedFeatures`, a hook on that pass). Only the summary is kept (mean distances, the
AUROC): tokens.jsonl is per token and the score is a window's, so no per-window file is written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rtllm.evaluation.metrics import auroc
from rtllm.lm.data import pack, read_texts, tokenize_texts

MAX_REFERENCE_WINDOWS = 256  # evenly spaced over the reference: its cost stays one small forward
VARIANCE_FLOOR = 1e-4  # of the mean per-dimension variance
HOW_TO_GET_IT = ("pass --reference with the text the model was trained or sampled on "
                 "(rtllm.evaluate(..., reference=[paths]))")


@dataclass(frozen=True)
class ReferenceChoice:
    """The reference texts (None: no feature score), where they came from ("given",
    "manifest", "off", "missing"), and when there are none and none were refused, why and
    what to do (one line); `encoding`: the run's, for the manifest's texts."""

    paths: tuple[str, ...] | None
    source: str
    note: str | None = None
    encoding: str | None = None

    def text_encoding(self, evaluation_encoding: str | None) -> str | None:
        """The manifest's texts are read as the run read them, named ones as the evaluation's."""
        return self.encoding if self.source == "manifest" else evaluation_encoding


def skipped(ref: ReferenceChoice, err: ValueError) -> str:
    """Why there is no feature score when `ref`'s texts cannot serve (unreadable, too short): a
    text the user named is refused (raises `err`); the manifest's is skipped with this reason."""
    if ref.source != "manifest":
        raise err
    return f"no feature-distance score: {err}"


def resolve_reference(ensemble_dir: str | Path, reference) -> ReferenceChoice:
    """`reference`: "manifest" or None (the run's training texts, config["train"] of
    ensemble.json, when they exist here), () or ["none"] (no feature score), or paths."""
    if reference is None or (isinstance(reference, str) and reference == "manifest"):
        return _from_manifest(Path(ensemble_dir))
    if isinstance(reference, (str, Path)):
        reference = [reference]
    reference = tuple(str(p) for p in reference)
    if not reference or reference == ("none",):
        return ReferenceChoice(None, "off")
    return ReferenceChoice(reference, "given")


def _from_manifest(ensemble_dir: Path) -> ReferenceChoice:
    try:
        config = json.loads((ensemble_dir / "ensemble.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        config = None
    train = config.get("train") if isinstance(config, dict) else None
    if not train or not isinstance(train, (list, tuple)) or not all(isinstance(p, str) for p in train):
        return ReferenceChoice(None, "missing", f"no feature-distance score: {ensemble_dir / 'ensemble.json'} "
                               f"records no training text; {HOW_TO_GET_IT}")
    absent = [p for p in train if not Path(p).exists()]
    if absent:
        return ReferenceChoice(None, "missing", f"no feature-distance score: the run's training text "
                               f"{absent[0]} is not here; {HOW_TO_GET_IT}")
    encoding = config.get("encoding")
    return ReferenceChoice(tuple(train), "manifest", encoding=encoding if isinstance(encoding, str) else None)


def reference_windows(tokenizer, paths: Sequence[str | Path], seq_len: int, *, encoding: str | None = None,
                      cap: int = MAX_REFERENCE_WINDOWS) -> torch.Tensor:
    """The reference text cut into windows `[n, seq_len + 1]` like the evaluated texts, at most
    `cap` of them, evenly spaced; ValueError (saying what to do) when fewer than 2 fit."""
    stream, _ = tokenize_texts(read_texts(paths, encoding), tokenizer)
    names = ", ".join(Path(p).name for p in paths)
    if len(stream) < 2 * seq_len + 1:
        raise ValueError(f"the reference text ({names}) has {len(stream)} tokens, fewer than two windows "
                         f"of {seq_len} + 1 for the feature distance's mean and variance; pass more "
                         f"reference text, a smaller --seq-len, or --reference none")
    windows = pack(stream, seq_len, what="the reference text")
    if len(windows) > cap:
        windows = windows[np.unique(np.linspace(0, len(windows) - 1, cap).round().astype(np.int64))]
    return windows


def prepare(ensemble_dir: str | Path, reference, tokenizer, seq_len: int, encoding: str | None = None
            ) -> tuple[ReferenceChoice, torch.Tensor | None, str | None]:
    """(choice, reference windows or None, why there are none): `reference` as in
    resolve_reference, None meaning no score. A text the user named that does not fill two
    windows is refused (ValueError); the manifest's is skipped, with the reason."""
    ref = resolve_reference(ensemble_dir, () if reference is None else reference)
    if ref.paths is None:
        return ref, None, ref.note
    try:
        return ref, reference_windows(tokenizer, ref.paths, seq_len, encoding=ref.text_encoding(encoding)), None
    except ValueError as err:
        return ref, None, skipped(ref, err)


def window_mean(hidden: torch.Tensor) -> torch.Tensor:
    """A window's feature: the mean over its positions of hidden states `[W, T, H]`, averaged in
    fp32 and returned `[W, H]` float64 on the CPU (no fp64 copy on the device)."""
    return hidden.mean(1, dtype=torch.float32).cpu().double()


def window_features(model, windows: torch.Tensor, device: torch.device, pieces=None) -> torch.Tensor:
    """Per window `[W, T + 1]`: the mean over its T input positions of the final hidden state,
    `[W, hidden]` float64 on the CPU. A dispatched model (hf_device_map) runs whole, its base
    model's output taken by a hook (its offload hooks sit on the modules accelerate chose)."""
    from rtllm.evaluation.offload import PieceSize, forward_in_pieces

    pieces = pieces or PieceSize()
    dispatched = getattr(model, "hf_device_map", None) is not None
    captured: list[torch.Tensor] = []
    if dispatched:
        handle = model.base_model.register_forward_hook(lambda m, a, out: captured.append(out[0]))

        def forward(x):
            captured.clear()  # a forward that ran out of memory after the base model left one
            model(input_ids=x[:, :-1], use_cache=False)
            return captured.pop()
    else:
        def forward(x):
            return model.base_model(input_ids=x[:, :-1], use_cache=False)[0]
    out = torch.empty(len(windows), model.config.hidden_size, dtype=torch.float64)

    def consume(hidden, start):
        out[start:start + len(hidden)] = window_mean(hidden)
    try:
        with torch.inference_mode():
            forward_in_pieces(forward, windows.to(device) if not dispatched else windows, consume, pieces)
    finally:
        if dispatched:
            handle.remove()
    return out


class CapturedFeatures:
    """Window features of forwards that run anyway (the baseline's NLL pass): a hook on the base
    model keeps each forward's mean final hidden state `[windows, hidden]`, in call order;
    `close()` removes the hook and returns them `[W, hidden]` float64 on the CPU."""

    def __init__(self, model) -> None:
        self._parts: list[torch.Tensor] = []
        self._handle = model.base_model.register_forward_hook(self._keep)

    def _keep(self, module, args, out) -> None:
        self._parts.append(window_mean(out[0]))

    def close(self) -> torch.Tensor:
        self._handle.remove()
        return torch.cat(self._parts) if self._parts else torch.empty(0, dtype=torch.float64)


def fit(reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and floored variance of the reference windows' features `[n, H]`."""
    mean, var = reference.mean(0), reference.var(0)
    return mean, var.clamp_min(VARIANCE_FLOOR * float(var.mean()) + torch.finfo(var.dtype).tiny)


def distances(features: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> np.ndarray:
    """Mean squared standardized distance of each window's features from the reference."""
    return (((features - mean) ** 2) / var).mean(1).numpy()


def feature_summary(reference: torch.Tensor, evaluated: torch.Tensor, is_ood: np.ndarray) -> dict:
    """The summary keys: mean distance of the in-distribution (and OOD) windows, and the AUROC
    of telling OOD windows from in-distribution ones by it (as the other OOD AUROCs)."""
    dist = distances(evaluated, *fit(reference))
    is_ood = np.asarray(is_ood, dtype=bool)
    out = {"mean_feature_distance": float(dist[~is_ood].mean())}
    if is_ood.any():
        out["mean_feature_distance_ood"] = float(dist[is_ood].mean())
        out["auroc_ood_feature"] = auroc(dist[~is_ood], dist[is_ood])
    out["n_reference_windows"] = len(reference)
    return out


def score(model, windows: torch.Tensor, reference: torch.Tensor, is_ood: np.ndarray,
          device: torch.device) -> dict:
    """feature_summary of `windows` against `reference` (both `[n, T + 1]`), in one pass of `model`."""
    features = window_features(model, torch.cat([reference, windows]), device)
    return feature_summary(features[:len(reference)], features[len(reference):], is_ood)
