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


def fmt_value(value) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
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
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items)
    return f'<table class="inputs">{body}</table>'


def headline(context: dict | None) -> str:
    """'<model>: <texts>' for the page title, or a generic title."""
    if not context or not context.get("model"):
        return "Token-level predictive uncertainty"
    return (f"Token-level predictive uncertainty of {Path(context['model']).name} on "
            f"{_names(context.get('texts'))}")
