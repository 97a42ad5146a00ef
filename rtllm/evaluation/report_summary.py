"""The top of tokens.html in words: what was evaluated (model, ensemble, texts) and the summary
numbers, each with a label and a one-line explanation instead of a bare key."""
from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

# (summary key, label, what it means); the page lists them in this order, then any other key.
SUMMARY_ROWS = (
    ("nll_bma", "NLL of the ensemble", "negative log-likelihood of the observed next token under the "
     "Bayesian model average (BMA: the mean of the samples' predicted probabilities), nats per token; "
     "lower is better"),
    ("nll_baseline", "NLL of the starting checkpoint", "the same for the model the sampling started "
     "from"),
    ("nll_samples_mean", "NLL of single samples", "the samples' NLLs averaged: what one sample alone "
     "scores"),
    ("perplexity_bma", "perplexity of the ensemble", "exp(NLL of the ensemble)"),
    ("accuracy_top1", "top-1 accuracy", "how often the ensemble's most probable token is the observed one"),
    ("ece_top1", "calibration error (ECE)", "expected calibration error of the top-1 token, equal-width "
     "confidence bins (reliability.png); 0 is perfectly calibrated"),
    ("ece_top1_equal_mass", "calibration error, equal-mass bins", "the same with bins of equal token count"),
    ("brier", "Brier score", "squared error of the predicted distribution against the observed token"),
    ("mean_total", "total uncertainty", "entropy of the ensemble's prediction, nats, mean over tokens"),
    ("mean_aleatoric", "aleatoric uncertainty", "the samples' mean entropy: uncertainty in the text itself"),
    ("mean_epistemic", "epistemic uncertainty", "total minus aleatoric (mutual information): how much the "
     "samples disagree, i.e. what the model does not know"),
    ("mean_epistemic_ood", "epistemic uncertainty, OOD", "the same on the out-of-distribution text"),
    ("mean_total_ood", "total uncertainty, OOD", "total uncertainty on the out-of-distribution text"),
    ("auroc_ood_epistemic", "OOD detection by epistemic (AUROC)", "how well a window's mean epistemic "
     "uncertainty tells OOD windows from in-distribution ones: 0.5 is chance, 1 perfect"),
    ("auroc_ood_total", "OOD detection by total (AUROC)", "the same with total uncertainty"),
    ("auroc_ood_feature", "OOD detection by feature distance (AUROC)", "the same with each window's "
     "feature distance from the reference text: how new the text is to one model (baseline or first "
     "sample), not how much the samples disagree"),
    ("mean_feature_distance", "feature distance, in-distribution", "mean squared standardized distance of "
     "a window's mean final hidden state from the reference text's windows (per-dimension mean and "
     "variance; ~1 for windows like the reference's), mean over in-distribution windows"),
    ("mean_feature_distance_ood", "feature distance, OOD", "the same over the out-of-distribution windows"),
    ("feature_model", "features from", "the model whose features are compared: the baseline (starting "
     "checkpoint) or the first sample used"),
    ("feature_reference", "reference text of the features", "the text the model was trained or sampled on "
     "(--reference; default: the run's training texts)"),
    ("n_reference_windows", "reference windows", "windows of the reference text the distance is fit on "
     "(at most 256, evenly spaced)"),
    ("epistemic_note", "note on epistemic uncertainty", "printed when the samples' disagreement does not "
     "separate the OOD text"),
    ("n_tokens", "tokens scored, in-distribution", "every token but the first of each text is predicted"),
    ("n_tokens_ood", "tokens scored, OOD", ""),
    ("n_windows", "windows, in-distribution", "the text is cut into windows of seq_len tokens; each "
     "window's first prediction has one token of context"),
    ("n_windows_ood", "windows, OOD", ""),
    ("seq_len", "window length", "tokens predicted per window (the x axis of uncertainty_by_position.png)"),
    ("n_samples_used", "samples used", "posterior samples averaged in the BMA"),
    ("n_samples_masked", "samples masked", "samples left out (flagged by the sampling run, or held-out "
     "loss above --mask-heldout-above)"),
)
_ROW = {key: (label, meaning) for key, label, meaning in SUMMARY_ROWS}
# When to say plainly that epistemic uncertainty misses the OOD text: its AUROC below this, or
# this far below what total entropy or the feature distance reach on the same windows.
EPISTEMIC_NOTE_BELOW = 0.7
EPISTEMIC_NOTE_GAP = 0.15


def epistemic_note(summary: dict) -> str | None:
    """One plain line when the samples' disagreement (mutual information) does not separate the
    OOD text from the in-distribution text, saying what does; None when it separates it well."""
    epi = summary.get("auroc_ood_epistemic")
    if epi is None or not math.isfinite(epi):
        return None
    others = [(name, summary[key]) for key, name in (("auroc_ood_total", "total entropy"),
                                                     ("auroc_ood_feature", "feature distance"))
              if summary.get(key) is not None and math.isfinite(summary[key])]
    best = max((v for _, v in others), default=-math.inf)
    if epi >= EPISTEMIC_NOTE_BELOW and epi >= best - EPISTEMIC_NOTE_GAP:
        return None
    what = ("does not separate this OOD text from the in-distribution text" if epi < EPISTEMIC_NOTE_BELOW
            else "separates this OOD text less well than the other scores")
    if epi < 0.5:  # inverted: the samples agree more on the new text than on the familiar one
        what += " (it is mostly lower on the OOD windows)"
    good = [f"{name} ({v:.2f})" for name, v in others if v >= EPISTEMIC_NOTE_BELOW and v > epi]
    better = (" and ".join(good) + (" separates" if len(good) == 1 else " separate") + " it better" if good else
              "neither does " + " nor ".join(f"{name} ({v:.2f})" for name, v in others) if others else
              "no other score was computed")
    return (f"the samples' disagreement (epistemic uncertainty, AUROC {epi:.2f}) {what}; {better}. "
            f"Mutual information follows how often the model read the input tokens, so OOD text made "
            f"of familiar tokens gets the training text's spread (docs/uncertainty.md)")


def fmt_value(value) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(fmt_value, value))
    return str(value)


def summary_html(summary: dict) -> str:
    """Every key of `summary` once: known ones labelled and explained, in SUMMARY_ROWS order."""
    keys = [k for k, _, _ in SUMMARY_ROWS if k in summary] + [k for k in summary if k not in _ROW]
    rows = []
    for key in keys:
        label, meaning = _ROW.get(key, (key, ""))
        rows.append(f"<tr><th>{html.escape(label)}</th><td>{html.escape(fmt_value(summary[key]))}</td>"
                    f"<td class=\"meaning\">{html.escape(meaning)} <code>{html.escape(key)}</code></td></tr>")
    return "".join(rows)


def _names(paths) -> str:
    names = [Path(p).name for p in paths or ()]
    return ", ".join(names) if names else "none"


def inputs_html(context: dict | None) -> str:
    """What was evaluated: model, ensemble, texts, baseline ('' when nothing is known)."""
    if not context:
        return ""
    items = []
    if context.get("model"):
        items.append(("model", context["model"]))
    if context.get("ensemble"):
        items.append(("ensemble", context["ensemble"]))
    items.append(("in-distribution text", _names(context.get("texts"))))
    items.append(("out-of-distribution text", _names(context.get("ood_texts"))))
    if context.get("baseline_dir"):
        items.append(("starting checkpoint (baseline)", context["baseline_dir"]))
    if context.get("reference_texts"):
        items.append(("reference text (feature distance)", _names(context["reference_texts"])))
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items)
    return f'<table class="inputs">{body}</table>'


def headline(context: dict | None) -> str:
    """'<model>: <texts>' for the page title, or a generic title."""
    if not context or not context.get("model"):
        return "Token-level predictive uncertainty"
    return (f"Token-level predictive uncertainty of {Path(context['model']).name} on "
            f"{_names(context.get('texts'))}")
