"""`rtllm generate`: continue a prompt with the ensemble and show, token by token, where the
samples disagree: colored text for a terminal, and an HTML page in the style of the evaluation
report (report.py: the same shading, legend, hover numbers).
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rtllm.evaluation.report import (_PAGE, COLOR_PERCENTILE, SHADE_MAX_ALPHA, SHADE_RGB, SHADES,
                                     _alpha, _fmt, _scale, _token_html)

# data-v of each token, in the order of report.SHADES (what the page's selector indexes)
_KEYS = ("epistemic", "entropy_total", "aleatoric", "nll")


@dataclass
class Generation:
    """A prompt and its continuation, one entry per generated token (values in nats)."""

    prompt: str
    tokens: list[str]
    token_ids: list[int]
    nll: np.ndarray  # -log BMA probability of the generated token
    entropy_total: np.ndarray
    aleatoric: np.ndarray
    epistemic: np.ndarray
    n_samples: int

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def summary(self) -> dict:
        return {"samples": self.n_samples, "new tokens": len(self.tokens),
                "mean epistemic": float(self.epistemic.mean()) if self.tokens else float("nan"),
                "max epistemic": float(self.epistemic.max()) if self.tokens else float("nan"),
                "mean NLL (of the chosen tokens)": float(self.nll.mean()) if self.tokens else float("nan")}


def generate_text(lm, prompt: str, *, max_new_tokens: int = 40, do_sample: bool = False,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int = 0) -> Generation:
    """Continue `prompt` with an EnsembleForCausalLM (its tokenizer encodes and decodes)."""
    if not prompt:
        raise ValueError("--prompt is empty; give some text to continue")
    tok = lm.tokenizer
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    if ids.shape[1] == 0:
        raise ValueError(f"the prompt {prompt!r} encodes to no tokens; give some text to continue")
    context = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", None)
    if context is not None and ids.shape[1] + max_new_tokens > context:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + --max-new-tokens ({max_new_tokens}) "
                         f"exceeds the model's context of {context} tokens; shorten one of them")
    out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                      temperature=temperature, top_k=top_k, top_p=top_p,
                      eos_token_id=getattr(tok, "eos_token_id", None),
                      generator=torch.Generator(device=lm.device).manual_seed(seed),
                      return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    values = {k: getattr(out, k)[0, :len(new)].double().cpu().numpy()
              for k in ("entropy_total", "aleatoric", "epistemic")}
    return Generation(prompt, [tok.decode([t]) for t in new], new,
                      -out.logprob[0, :len(new)].double().cpu().numpy(), n_samples=len(lm), **values)


# -- the terminal -----------------------------------------------------------------------------------
def terminal_text(gen: Generation, color: bool = True) -> str:
    """The prompt plain, each new token on a background from white to the report's red by its
    epistemic uncertainty (24-bit ANSI colors), then a legend line."""
    vmax = _scale(gen.epistemic)
    if not color:
        return gen.prompt + "".join(gen.tokens)
    parts = [gen.prompt]
    for text, v in zip(gen.tokens, gen.epistemic):
        a = _alpha(float(v), vmax)
        r, g, b = (round(255 + a * (c - 255)) for c in SHADE_RGB)
        parts.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{text}\x1b[0m")
    legend = (f"\n\x1b[2m(background: epistemic uncertainty, white 0 to red >= {_fmt(vmax)} nats; "
              f"{gen.n_samples} samples)\x1b[0m")
    return "".join(parts) + legend


# -- the HTML page ----------------------------------------------------------------------------------
def generation_html(gen: Generation) -> str:
    """A page like the evaluation report's tokens.html: the prompt, then the continuation shaded
    by epistemic (or total, aleatoric, NLL) uncertainty; hover a token for its numbers."""
    table = {k: getattr(gen, k) for k in _KEYS}
    vmaxes = [_scale(table[k]) for k in _KEYS]
    rgb = ",".join(map(str, SHADE_RGB))
    spans = []
    for i, text in enumerate(gen.tokens):
        values = [float(table[k][i]) for k in _KEYS]
        title = "\n".join([f"new token {i + 1}, token id {gen.token_ids[i]}",
                           f"p(token) = {_fmt(math.exp(-values[3]))}", f"NLL = {_fmt(values[3])}",
                           f"total = {_fmt(values[1])}", f"aleatoric = {_fmt(values[2])}",
                           f"epistemic = {_fmt(values[0])}"])
        spans.append(f'<span class="t" data-v="{",".join(f"{v:.6g}" for v in values)}" '
                     f'title="{html.escape(title, quote=True)}" '
                     f'style="background:rgba({rgb},{_alpha(values[0], vmaxes[0])})">'
                     f'{_token_html(text)}</span>')
    section = ('<section><h2>Continuation</h2><div class="win"><div class="wh">prompt, then '
               f'{len(gen.tokens)} generated tokens</div><div class="txt">'
               f'<span class="prompt">{_token_html(gen.prompt)}</span>{"".join(spans)}'
               '</div></div></section>')
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in gen.summary().items())
    options = "".join(f'<option value="{j}">{html.escape(label)}</option>'
                      for j, (label, _) in enumerate(SHADES))
    scales = json.dumps({"vmax": vmaxes, "labels": [label for label, _ in SHADES], "rgb": rgb,
                         "maxAlpha": SHADE_MAX_ALPHA})
    page = _PAGE.format(rgb=rgb, max_alpha=SHADE_MAX_ALPHA, summary=rows, options=options,
                        vmax=_fmt(vmaxes[0]), half=_fmt(vmaxes[0] / 2), pct=_fmt(COLOR_PERCENTILE),
                        sections=section, scales=scales, title="Generated text and its uncertainty",
                        inputs=f"<p>{gen.n_samples} samples; the prompt in grey, then the continuation.</p>",
                        shown="every token is shown below", n_id=len(gen.tokens), n_ood=0, note="")
    return page.replace("</style>", ".prompt { color: #777; }\n</style>")


def write_generation(gen: Generation, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generation_html(gen), encoding="utf-8")
    return path
