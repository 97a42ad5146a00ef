"""Reports of a per-token uncertainty table: a reliability diagram, uncertainty by position,
and a self-contained HTML page of the text shaded by epistemic uncertainty.

The table (one row per evaluated token) is a dict of equal-length arrays with the keys in
TABLE_KEYS; the quantities are those of algorithms.md section 4, in nats.
"""
from __future__ import annotations

import html
import json
import math
import unicodedata
from pathlib import Path

import numpy as np

from rtllm.evaluation.report_summary import fmt_value, headline, inputs_html, summary_html

TABLE_KEYS = ("window", "position", "token_id", "token", "nll_bma", "p_observed", "entropy_total",
              "aleatoric", "epistemic", "nll_samples_mean", "confidence", "correct",
              "nll_baseline", "is_ood")
N_BINS = 15
MAX_TOKENS = 5000           # per section of the HTML page
MIN_BIN_TOKENS = 5          # a reliability bin with fewer tokens is not drawn
COLOR_PERCENTILE = 99.0     # the shading saturates here, so a few outliers don't wash it out
SHADE_RGB, SHADE_MAX_ALPHA = (214, 39, 40), 0.85
# Quantities the page can shade by: (label, table key); the first is the default.
SHADES = (("epistemic", "epistemic"), ("total", "entropy_total"), ("aleatoric", "aleatoric"),
          ("NLL", "nll_bma"))


def write_reports(table: dict[str, np.ndarray], summary: dict, out_dir: Path,
                  max_tokens: int = MAX_TOKENS, context: dict | None = None) -> dict[str, Path]:
    """Write reliability.png, uncertainty_by_position.png and tokens.html into out_dir;
    `context` names what was evaluated (`rtllm.evaluation.report_summary.inputs_html`)."""
    t = _checked(table)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"reliability": out_dir / "reliability.png",
             "uncertainty_by_position": out_dir / "uncertainty_by_position.png",
             "tokens": out_dir / "tokens.html"}
    plot_reliability(t, paths["reliability"], summary.get("n_samples_used"))
    plot_uncertainty_by_position(t, paths["uncertainty_by_position"], headline(context))
    paths["tokens"].write_text(tokens_html(t, summary, max_tokens, context), encoding="utf-8")
    return paths


def _checked(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    t = {k: np.asarray(v) for k, v in table.items()}
    n = len(t.get("token", ()))
    t.setdefault("is_ood", np.zeros(n, dtype=bool))
    t.setdefault("nll_baseline", np.full(n, np.nan))
    missing = [k for k in TABLE_KEYS if k not in t]
    if missing:
        raise ValueError(f"the token table lacks the keys {missing}")
    lengths = {k: len(t[k]) for k in TABLE_KEYS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the token table's arrays differ in length: {lengths}")
    if n == 0:
        raise ValueError("the token table is empty")
    t["is_ood"] = t["is_ood"].astype(bool)
    t["correct"] = t["correct"].astype(bool)
    return t


# -- calibration ---------------------------------------------------------------------------------
def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Equal-width confidence bins on [0, 1]: count, mean confidence, accuracy, and the ECE.

    Bin i holds confidence in [i/n, (i+1)/n), the last bin also 1.0. Empty bins have NaN
    confidence and accuracy; ECE = sum_i count_i / N * |accuracy_i - confidence_i|.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    idx = np.clip(np.floor(conf * n_bins).astype(np.int64), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, n_bins) / counts
        accuracy = np.bincount(idx, hit, n_bins) / counts
    filled = counts > 0
    ece = float(np.sum(counts[filled] / counts.sum() * np.abs(accuracy[filled] - mean_conf[filled])))
    return {"edges": np.linspace(0, 1, n_bins + 1), "counts": counts, "confidence": mean_conf,
            "accuracy": accuracy, "ece": ece}


def _figure(**kw):
    # A bare Figure on the Agg canvas: no pyplot state, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def plot_reliability(t: dict[str, np.ndarray], path: Path, n_samples: int | None = None) -> None:
    """Accuracy vs confidence of the BMA's top-1 token (in-distribution tokens), with counts.
    Bins with fewer than MIN_BIN_TOKENS tokens are not drawn: their accuracy is noise."""
    ind = ~t["is_ood"] if (~t["is_ood"]).any() else np.ones(len(t["is_ood"]), dtype=bool)
    b = reliability_bins(t["confidence"][ind], t["correct"][ind])
    centers = (b["edges"][:-1] + b["edges"][1:]) / 2
    width = 1.0 / N_BINS
    fig = _figure(figsize=(6.0, 6.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfect calibration")
    shown = b["counts"] >= MIN_BIN_TOKENS
    top.bar(centers[shown], b["accuracy"][shown], width=width * 0.95, color="C0",
            edgecolor="white", label="accuracy")
    top.bar(centers[shown], (b["confidence"] - b["accuracy"])[shown], bottom=b["accuracy"][shown],
            width=width * 0.95, color="none", edgecolor="C3", hatch="//", lw=0.8, label="gap to confidence")
    members = f"{n_samples} samples" if n_samples else "the samples"
    title = (f"Calibration of the Bayesian model average (BMA) of {members}: its top-1 token\n"
             f"{int(ind.sum())} in-distribution tokens: ECE ({N_BINS} bins) = {b['ece']:.4f}")
    if t["is_ood"].any() and ind.sum() < len(ind):
        o = reliability_bins(t["confidence"][t["is_ood"]], t["correct"][t["is_ood"]])
        filled = o["counts"] >= MIN_BIN_TOKENS
        top.plot(o["confidence"][filled], o["accuracy"][filled], "o-", color="C1", ms=4, lw=1,
                 label="OOD")
        title += f"\nout-of-distribution tokens: ECE = {o['ece']:.4f} (orange)"
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    top.set_title(title, fontsize=9)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, b["counts"], width=width * 0.95, color="0.55")
    for x, c in zip(centers, b["counts"]):
        if c:
            bottom.annotate(str(c), (x, c), ha="center", va="bottom", fontsize=6)
    bottom.set(xlabel="confidence: the BMA's probability of its top-1 token", ylabel="tokens", yscale="log")
    bottom.set_ylim(0.8, max(2, b["counts"].max()) * 3)
    fig.savefig(path, dpi=120)


def plot_uncertainty_by_position(t: dict[str, np.ndarray], path: Path, title: str | None = None) -> None:
    """Mean total / aleatoric / epistemic entropy per position in the window.

    Epistemic gets its own panel: it is usually 10-100x smaller than the other two. The legend
    sits below the panels, where it covers no curve.
    """
    fig = _figure(figsize=(10.0, 4.8), layout="constrained")
    fig.suptitle((title or "Token-level predictive uncertainty") + ", by position in the window", fontsize=10)
    left, right = fig.subplots(1, 2, sharex=True)
    splits = [("in-distribution", ~t["is_ood"], "-"), ("OOD", t["is_ood"], "--")]
    for name, mask, ls in splits:
        if not mask.any():
            continue
        pos = t["position"][mask].astype(np.int64)
        counts = np.bincount(pos)
        at = np.flatnonzero(counts)
        for ax, key, label, color in ((left, "entropy_total", "total", "C0"),
                                      (left, "aleatoric", "aleatoric", "C1"),
                                      (right, "epistemic", "epistemic", "C2")):
            mean = np.bincount(pos, t[key][mask].astype(np.float64))[at] / counts[at]
            ax.plot(at, mean, ls=ls, color=color, lw=1.2, label=f"{label}, {name}")
    xlabel = "position in the window (tokens of context the prediction had)"
    left.set(xlabel=xlabel, ylabel="nats per token", title="total and aleatoric uncertainty")
    right.set(xlabel=xlabel, ylabel="nats per token", title="epistemic uncertainty (mutual information)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    handles = [h for ax in (left, right) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8)
    fig.savefig(path, dpi=120)


# -- HTML ----------------------------------------------------------------------------------------
_fmt = fmt_value  # one number format for the page and its summary


def _token_html(text: str) -> str:
    """Escaped token text; a newline shows as a return sign and a line break, other control
    characters as \\xNN. Spaces and tabs stay as they are (the text is white-space: pre-wrap)."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append('<span class="nl">\u21b5</span><br>')
        elif ch != "\t" and unicodedata.category(ch) == "Cc":
            out.append(f'<span class="ctl">\\x{ord(ch):02x}</span>')
        else:
            out.append(html.escape(ch))
    return "".join(out)


def _alpha(v: float, vmax: float) -> float:
    if not math.isfinite(v):
        return 0.0
    return round(SHADE_MAX_ALPHA * min(max(v / vmax, 0.0), 1.0), 3)


def _scale(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    vmax = float(np.percentile(finite, COLOR_PERCENTILE)) if finite.size else 0.0
    return vmax if vmax > 0 else (float(finite.max()) if finite.size and finite.max() > 0 else 1.0)


def _title(t: dict[str, np.ndarray], i: int, first_window: int) -> str:
    lines = [f"window {int(t['window'][i]) - first_window} of this text, position {int(t['position'][i])}, "
             f"token id {int(t['token_id'][i])}",
             f"p(observed) = {_fmt(float(t['p_observed'][i]))}",
             f"NLL = {_fmt(float(t['nll_bma'][i]))} (samples' mean {_fmt(float(t['nll_samples_mean'][i]))})",
             f"total = {_fmt(float(t['entropy_total'][i]))}",
             f"aleatoric = {_fmt(float(t['aleatoric'][i]))}",
             f"epistemic = {_fmt(float(t['epistemic'][i]))}"]
    if math.isfinite(float(t["nll_baseline"][i])):
        lines.append(f"NLL baseline = {_fmt(float(t['nll_baseline'][i]))}")
    lines.append(f"top-1 {'correct' if t['correct'][i] else 'wrong'}, "
                 f"confidence {_fmt(float(t['confidence'][i]))}")
    return "\n".join(lines)


def _section(t, rows: np.ndarray, heading: str, vmaxes: list[float], max_tokens: int,
             first_token: str | None = None) -> str:
    """One text as it reads: tokens in order, windows marked by a thin line (not boxes, which
    split words), numbered from 0 within the text; the text's first token, which nothing
    predicts, shown unshaded."""
    rows = rows[np.lexsort((t["position"][rows], t["window"][rows]))]
    n_all, n_windows_all = len(rows), len(np.unique(t["window"][rows]))
    shown = rows[:max_tokens]
    first_window = int(t["window"][rows[0]]) if len(rows) else 0
    parts = [f'<section><h2>{html.escape(heading)}</h2>']
    if len(shown) < n_all:
        parts.append(f'<p class="note">Showing the first {len(shown)} of {n_all} tokens '
                     f'({len(np.unique(t["window"][shown]))} of {n_windows_all} windows). '
                     f'Every token is in tokens.jsonl.</p>')
    keys = [key for _, key in SHADES]
    rgb = ",".join(map(str, SHADE_RGB))
    parts.append('<div class="txt">')
    if first_token is not None:
        parts.append(f'<span class="t0" title="the first token of the text: context only, nothing '
                     f'predicts it">{_token_html(first_token)}</span>')
    current = None
    for i in shown:
        w = int(t["window"][i])
        if w != current:
            if current is not None:
                parts.append(f'<span class="wb" title="window {w - first_window} starts"></span>')
            current = w
        values = [float(t[k][i]) for k in keys]
        data = ",".join(f"{v:.6g}" for v in values)
        parts.append(f'<span class="t" data-v="{data}" title="{html.escape(_title(t, i, first_window), quote=True)}" '
                     f'style="background:rgba({rgb},{_alpha(values[0], vmaxes[0])})">'
                     f'{_token_html(str(t["token"][i]))}</span>')
    parts.append("</div></section>")
    return "".join(parts)


def tokens_html(t: dict[str, np.ndarray], summary: dict, max_tokens: int = MAX_TOKENS,
                context: dict | None = None) -> str:
    """The page: what was evaluated, the summary in words, the legend, then each text."""
    t = _checked(t)
    context = context or {}
    first = context.get("first_tokens") or {}
    vmaxes = [_scale(t[key].astype(np.float64)) for _, key in SHADES]
    rows = np.arange(len(t["token"]))
    options = "".join(f'<option value="{j}">{html.escape(label)}</option>'
                      for j, (label, _) in enumerate(SHADES))
    names = lambda key: ", ".join(Path(p).name for p in context.get(key) or ()) or None  # noqa: E731
    sections = []
    if (~t["is_ood"]).any():
        sections.append(_section(t, rows[~t["is_ood"]], "In-distribution text" + (f": {names('texts')}" if
                                 names("texts") else ""), vmaxes, max_tokens, first.get("in")))
    if t["is_ood"].any():
        sections.append(_section(t, rows[t["is_ood"]], "Out-of-distribution text" + (f": {names('ood_texts')}" if
                                 names("ood_texts") else ""), vmaxes, max_tokens, first.get("ood")))
    n_id, n_ood = int((~t["is_ood"]).sum()), int(t["is_ood"].sum())
    shown = f"up to {max_tokens} tokens of each text are shown below" if max(n_id, n_ood) > max_tokens \
        else "every token is shown below"
    rgb = ",".join(map(str, SHADE_RGB))
    scales = json.dumps({"vmax": vmaxes, "labels": [label for label, _ in SHADES],
                         "rgb": rgb, "maxAlpha": SHADE_MAX_ALPHA})
    return _PAGE.format(rgb=rgb, max_alpha=SHADE_MAX_ALPHA, summary=summary_html(summary), options=options,
                        vmax=_fmt(vmaxes[0]), half=_fmt(vmaxes[0] / 2), pct=_fmt(COLOR_PERCENTILE),
                        sections="".join(sections), scales=scales, title=html.escape(headline(context)),
                        inputs=inputs_html(context), shown=shown, n_id=n_id, n_ood=n_ood,
                        note=f'<p class="warn">{html.escape(summary["epistemic_note"])}</p>'
                        if summary.get("epistemic_note") else "")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rtllm: {title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; padding: 0 1em;
  color: #222; }}
table.summary {{ border-collapse: collapse; margin-bottom: 1em; }}
table.summary th, table.summary td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}
table.summary td {{ font-family: ui-monospace, monospace; }}
table.summary td.meaning {{ font: 12px/1.35 system-ui, sans-serif; color: #555; }}
table.inputs th {{ text-align: left; padding-right: 1em; font-weight: normal; color: #555; }}
.wb {{ border-left: 1px dotted #999; margin: 0 1px; }}
.t0 {{ color: #777; }}
.legend {{ display: flex; align-items: center; gap: 0.6em; margin: 0.6em 0; flex-wrap: wrap; }}
.bar {{ width: 14em; height: 0.9em; border: 1px solid #aaa;
  background: linear-gradient(to right, rgba({rgb},0), rgba({rgb},{max_alpha})); }}
.ticks {{ display: flex; justify-content: space-between; width: 14em; font-size: 11px; color: #555; }}
.txt {{ white-space: pre-wrap; word-wrap: break-word; font-family: ui-monospace, monospace;
  padding: 4px 6px; }}
.t {{ border-radius: 2px; cursor: default; }}
.t:hover {{ outline: 1px solid #333; }}
.t:empty::after {{ content: "\\2205"; color: #aaa; }}
.nl, .ctl {{ color: #999; }}
.note {{ color: #a33; }}
.warn {{ background: #fff3e0; border-left: 4px solid #e69500; padding: 4px 8px; }}
#info {{ position: fixed; right: 1em; bottom: 1em; background: #fffbe8; border: 1px solid #ccb;
  padding: 4px 8px; white-space: pre; font: 12px ui-monospace, monospace; min-width: 18em; }}
</style></head>
<body>
<h1>{title}</h1>
{inputs}
<p>Each token of the text is shaded by how uncertain the ensemble was when predicting it from the
tokens before it (in its window); hover a token for all its numbers. {n_id} in-distribution and
{n_ood} out-of-distribution tokens were scored; {shown}. A dotted line marks where a new
window starts (its first prediction has one token of context).</p>
<h2>Summary</h2>
{note}
<table class="summary">{summary}</table>
<div class="legend">
  <label>shade by <select id="q">{options}</select></label>
  <div><div class="bar"></div><div class="ticks"><span>0</span><span id="half">{half}</span>
    <span id="vmax">&ge;{vmax}</span></div></div>
  <span>nats (scale saturates at the <span id="pct">{pct}</span>th percentile); hover a token for its numbers</span>
</div>
{sections}
<div id="info">hover a token</div>
<script>
(function () {{
  const S = {scales};
  const spans = document.querySelectorAll("span.t");
  const sel = document.getElementById("q"), info = document.getElementById("info");
  const fmt = v => Number(v.toPrecision(4)).toString();
  function shade() {{
    const k = +sel.value, vmax = S.vmax[k];
    for (const s of spans) {{
      const v = +s.dataset.v.split(",")[k];
      const a = isFinite(v) ? Math.round(1000 * S.maxAlpha * Math.min(Math.max(v / vmax, 0), 1)) / 1000 : 0;
      s.style.background = "rgba(" + S.rgb + "," + a + ")";
    }}
    document.getElementById("half").textContent = fmt(vmax / 2);
    document.getElementById("vmax").textContent = "\\u2265" + fmt(vmax);
  }}
  sel.addEventListener("change", shade);
  document.addEventListener("mouseover", e => {{
    const s = e.target.closest && e.target.closest("span.t");
    if (s) info.textContent = s.title;
  }});
  document.body.dataset.ready = "1";
}})();
</script>
</body></html>
"""
