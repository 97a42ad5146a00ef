"""rtllm generate: continuation with per-token uncertainty, terminal colors, the HTML page."""
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from ensemble_fixtures import write_ensemble

import rtllm
from rtllm.cli import main
from rtllm.evaluation.generation import generate_text, generation_html, terminal_text

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ensemble_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "ens"
    write_ensemble(tiny_model_dir, out, n=3, scale=0.3, sample_format="delta8")
    return out


@pytest.fixture(scope="module")
def generation(ensemble_dir):
    lm = rtllm.EnsembleForCausalLM.from_ensemble(ensemble_dir)
    return lm, generate_text(lm, "To be, or not", max_new_tokens=8)


def test_values_are_those_of_the_bma(generation):
    lm, gen = generation
    assert len(gen.tokens) == len(gen.token_ids) == 8
    ids = lm.tokenizer("To be, or not", add_special_tokens=False)["input_ids"] + gen.token_ids
    out = lm(torch.tensor([ids]), return_uncertainty=True)
    n = len(ids) - 8  # the distribution of new token i is read at position n - 1 + i
    np.testing.assert_allclose(gen.epistemic, out.epistemic[0, n - 1:-1].double().numpy(), atol=1e-5)
    logp = out.logits[0, n - 1:-1].gather(1, torch.tensor(gen.token_ids)[:, None])[:, 0]
    np.testing.assert_allclose(gen.nll, -logp.double().numpy(), atol=1e-5)


def test_terminal_colors_each_new_token(generation):
    _, gen = generation
    colored = terminal_text(gen, color=True)
    assert colored.startswith(gen.prompt) and colored.count("\x1b[48;2;") == len(gen.tokens)
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored).startswith(gen.prompt + gen.text)
    assert terminal_text(gen, color=False) == gen.prompt + gen.text


def test_html_carries_every_token_and_its_values(generation):
    _, gen = generation
    page = generation_html(gen)
    values = re.findall(r'<span class="t" data-v="([^"]+)"', page)
    assert len(values) == len(gen.tokens)
    first = [float(v) for v in values[0].split(",")]
    assert first == pytest.approx([gen.epistemic[0], gen.entropy_total[0], gen.aleatoric[0], gen.nll[0]],
                                  rel=1e-5)


def test_cli_writes_text_and_page(ensemble_dir, tmp_path, capsys):
    page = tmp_path / "g.html"
    assert main(["generate", "--ensemble", str(ensemble_dir), "--prompt", "To be",
                 "--max-new-tokens", "5", "--html", str(page), "--color", "always"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("To be") and out.out.count("\x1b[48;2;") == 5
    assert page.is_file() and "wrote" in out.err
    assert main(["generate", "--ensemble", str(ensemble_dir), "--prompt", "x",
                 "--max-new-tokens", "500", "--html", str(page)]) == 2
    assert "context" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_page_renders_in_headless_chromium(generation, tmp_path):
    _, gen = generation
    path = tmp_path / "g.html"
    path.write_text(generation_html(gen), encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.absolute().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-ready="1"' in dom.stdout  # the page's script ran to its end
    values = re.findall(r'<span class="t" data-v="([^"]+)"[^>]*style="background: ?rgba\(([^)]*)\)', dom.stdout)
    assert len(values) == len(gen.tokens)  # every generated token rendered, with its values
    alphas = [float(rgba.split(",")[-1]) for _, rgba in values]
    assert max(alphas) > 0  # shaded by the script from the values
