"""Reports on a synthetic token table: valid PNGs, an HTML page that round-trips every token
(special characters included) and its numbers, and, where Chromium is installed, renders."""
from __future__ import annotations

import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from rtllm.evaluation.report import _fmt, reliability_bins, tokens_html, write_reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPECIAL = ["<b>", "&amp;", '"quoted"', "it's", "\n", " two  spaces", "\t", "\u00e9\u2713",
           "", "a\nb", "</script>", "\x0b"]


def synthetic_table(windows_id=3, windows_ood=2, length=20, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = (windows_id + windows_ood) * length
    window = np.repeat(np.arange(windows_id + windows_ood), length)
    position = np.tile(np.arange(length), windows_id + windows_ood)
    is_ood = window >= windows_id
    tokens = np.array([f" tok{i}" for i in range(n)], dtype=object)
    tokens[: len(SPECIAL)] = SPECIAL
    tokens[-3:] = ["<i>ood</i>", "x & y", "\n\n"]
    confidence = rng.uniform(0.05, 1.0, n)
    aleatoric = rng.uniform(0.5, 4.0, n)
    epistemic = rng.exponential(0.05, n) * np.where(is_ood, 3.0, 1.0)
    p_obs = rng.uniform(0.001, 1.0, n)
    nll_baseline = -np.log(rng.uniform(0.001, 1.0, n))
    nll_baseline[::2] = np.nan
    perm = rng.permutation(n)  # rows in no particular order: the page sorts by window, position
    table = {
        "window": window, "position": position, "token_id": np.arange(n), "token": tokens,
        "nll_bma": -np.log(p_obs), "p_observed": p_obs, "entropy_total": aleatoric + epistemic,
        "aleatoric": aleatoric, "epistemic": epistemic, "nll_samples_mean": -np.log(p_obs) + 0.01,
        "confidence": confidence, "correct": rng.uniform(size=n) < confidence,
        "nll_baseline": nll_baseline, "is_ood": is_ood,
    }
    return {k: v[perm] for k, v in table.items()}


SUMMARY = {"nll_bma": 3.14159, "ece_top1": 0.0421, "mean_epistemic": 0.0512,
           "mean_epistemic_ood": 0.1623, "auroc_ood_epistemic": float("nan"), "note": "a<b & c"}


class TokenSpans(HTMLParser):
    """The text (a <br> read as a newline, the return sign and \\xNN markers read back) and
    title of every token span, per section."""

    def __init__(self):
        super().__init__()
        self.sections: list[list[tuple[str, str]]] = []
        self.depth = 0          # > 0 inside a token span
        self.skip = 0           # > 0 inside a marker span
        self.text = self.title = ""
        self.attrs_seen: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attrs_seen.append(a)
        if tag == "section":
            self.sections.append([])
        elif tag == "span" and "t" in (a.get("class") or "").split() and self.depth == 0:
            self.depth, self.text, self.title = 1, "", a.get("title", "")
        elif tag == "span" and self.depth:
            self.depth += 1
            if a.get("class") == "nl":
                self.skip = self.depth
            elif a.get("class") == "ctl":
                self.skip = -self.depth  # \xNN marker: decode its text
        elif tag == "br" and self.depth:
            self.text += "\n"

    def handle_endtag(self, tag):
        if tag == "span" and self.depth:
            if abs(self.skip) == self.depth:
                self.skip = 0
            self.depth -= 1
            if self.depth == 0:
                self.sections[-1].append((self.text, self.title))

    def handle_data(self, data):
        if self.depth and self.skip == 0:
            self.text += data
        elif self.depth and self.skip < 0:
            self.text += chr(int(data[2:], 16))


def parse(page: str) -> TokenSpans:
    p = TokenSpans()
    p.feed(page)
    p.close()
    return p


def expected_sections(t):
    order = np.lexsort((t["position"], t["window"]))
    return [[i for i in order if not t["is_ood"][i]], [i for i in order if t["is_ood"][i]]]


def test_reliability_bins_by_hand():
    conf = np.array([0.01, 0.05, 0.5, 0.52, 0.99, 1.0])
    hit = np.array([0, 0, 1, 0, 1, 1], dtype=bool)
    b = reliability_bins(conf, hit, n_bins=10)
    assert b["counts"].tolist() == [2, 0, 0, 0, 0, 2, 0, 0, 0, 2]  # 1.0 joins the last bin
    np.testing.assert_allclose(b["confidence"][[0, 5, 9]], [0.03, 0.51, 0.995])
    np.testing.assert_allclose(b["accuracy"][[0, 5, 9]], [0, 0.5, 1])
    assert np.isnan(b["accuracy"][1])
    assert b["ece"] == pytest.approx((2 * 0.03 + 2 * 0.01 + 2 * 0.005) / 6)


def test_write_reports_files_are_valid(tmp_path):
    import matplotlib.image

    table = synthetic_table()
    paths = write_reports(table, SUMMARY, tmp_path / "report")
    assert set(paths) == {"reliability", "uncertainty_by_position", "tokens"}
    for key in ("reliability", "uncertainty_by_position"):
        assert paths[key].read_bytes()[:8] == PNG_MAGIC
        img = matplotlib.image.imread(paths[key])
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05  # something is drawn
    page = paths["tokens"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_html_round_trips_every_token_and_its_numbers():
    table = synthetic_table()
    page = tokens_html(table, SUMMARY)
    spans = parse(page)
    assert len(spans.sections) == 2
    for got, rows in zip(spans.sections, expected_sections(table)):
        first_window = min(table["window"][i] for i in rows)  # each text numbers its windows from 0
        assert [text for text, _ in got] == [str(table["token"][i]) for i in rows]
        for (_, title), i in zip(got, rows):
            for key in ("p_observed", "nll_bma", "entropy_total", "aleatoric", "epistemic"):
                assert _fmt(float(table[key][i])) in title
            base = float(table["nll_baseline"][i])
            assert ("NLL baseline = " + _fmt(base) in title) == math.isfinite(base)
            assert f"window {table['window'][i] - first_window} of this text, position {table['position'][i]}" in title
    for key, value in SUMMARY.items():
        assert page.count(f"<code>{key}</code>") == 1  # every summary value, once
    assert f"<td>{_fmt(SUMMARY['ece_top1'])}</td>" in page and "<td>n/a</td>" in page


def test_html_escapes_special_characters():
    page = tokens_html(synthetic_table(), SUMMARY)
    # raw markup from the tokens never reaches the page; the escaped forms do
    assert "<b>" not in page and "<i>" not in page and page.count("</script>") == 1
    assert "&lt;b&gt;" in page and "&amp;amp;" in page and "&quot;quoted&quot;" in page
    assert "it&#x27;s" in page and "a&lt;b &amp; c" in page
    assert '<span class="nl">\u21b5</span><br>' in page      # a newline shows as a line break
    assert ">\\x0b</span>" in page and "\x0b" not in page     # control characters spelled out
    assert " two  spaces" in page and "white-space: pre-wrap" in page
    # self-contained: no external resources of any kind
    for needle in ("src=", "href=", "<link", "@import", "url(", "http://", "https://"):
        assert needle not in page


def test_html_caps_tokens_per_section():
    table = synthetic_table(windows_id=4, windows_ood=1, length=20)
    spans = parse(page := tokens_html(table, {}, max_tokens=30))
    assert [len(s) for s in spans.sections] == [30, 20]
    assert "Showing the first 30 of 80 tokens (2 of 4 windows)." in page
    # only in-distribution tokens: no OOD section
    no_ood = {k: v[~table["is_ood"]] for k, v in table.items()}
    assert "Out-of-distribution" not in tokens_html(no_ood, {})


def test_bad_tables_are_refused():
    table = synthetic_table()
    with pytest.raises(ValueError, match="lacks"):
        tokens_html({k: v for k, v in table.items() if k != "epistemic"}, {})
    with pytest.raises(ValueError, match="length"):
        tokens_html({**table, "window": table["window"][:-1]}, {})


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_page_renders_in_headless_chromium(tmp_path):
    table = synthetic_table()
    paths = write_reports(table, SUMMARY, tmp_path)
    url = paths["tokens"].absolute().as_uri()
    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-ready="1"' in dom.stdout  # the inline script ran to its end without an error
    spans = parse(dom.stdout)
    for got, rows in zip(spans.sections, expected_sections(table)):
        assert [text for text, _ in got] == [str(table["token"][i]) for i in rows]
    shot = tmp_path / "tokens.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1400",
                    "--hide-scrollbars", url)
    assert shot.exists() and shot.read_bytes()[:8] == PNG_MAGIC, res.stderr[-2000:]


CONTEXT = {"model": "runs/tiny-shakespeare-gpt2", "ensemble": "/data/my-ensemble",
           "texts": {"/corpus/tempest.txt": "h"}, "ood_texts": {"/usr/lib/python3/abc.py": "h"},
           "baseline_dir": "/data/tiny-shakespeare-gpt2", "first_tokens": {"in": "TH", "ood": "#!"}}


def test_page_says_what_was_evaluated_and_shows_each_text_whole():
    table = synthetic_table(windows_id=3, windows_ood=2, length=20)
    page = tokens_html(table, {**SUMMARY, "n_tokens": 60}, context=CONTEXT)
    assert "<h1>Token-level predictive uncertainty of tiny-shakespeare-gpt2 on tempest.txt</h1>" in page
    for name in ("/data/my-ensemble", "abc.py", "/data/tiny-shakespeare-gpt2"):
        assert name in page
    # the first token of each text, which no window predicts, is shown (unshaded) before the rest
    assert page.count('<span class="t0"') == 2 and ">TH</span>" in page and ">#!</span>" in page
    assert page.index(">TH</span>") < page.index('class="t"')
    # windows are marked by a thin line, not boxed (a box splits words); OOD windows count from 0
    assert 'class="win"' not in page and page.count('class="wb"') == (3 - 1) + (2 - 1)
    ood = page[page.index("Out-of-distribution text: abc.py"):]
    assert "window 0 of this text, position" in ood and "window 3 of this text" not in ood
    # summary values labelled and explained, each once
    assert "Bayesian model average" in page and page.count("<code>n_tokens</code>") == 1
    assert "every token is shown below" in page


def test_a_capped_page_says_so_at_the_top_and_where_the_rest_is():
    table = synthetic_table(windows_id=4, windows_ood=1, length=20)
    page = tokens_html(table, {}, max_tokens=30)
    assert "up to 30 tokens of each text are shown below" in page
    assert "Every token is in tokens.jsonl." in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (/usr/bin/chromium)")
def test_page_in_headless_chromium_names_the_model_and_texts_and_shows_the_first_token(tmp_path):
    paths = write_reports(synthetic_table(), SUMMARY, tmp_path, context=CONTEXT)
    dom = _chromium(tmp_path, "--dump-dom", paths["tokens"].absolute().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-ready="1"' in dom.stdout  # rendered, and the script ran to its end
    for text in ("tiny-shakespeare-gpt2", "tempest.txt", "abc.py", ">TH</span>", ">#!</span>"):
        assert text in dom.stdout, text
