"""`rtllm sample --sampler smile` on the tiny GPT-2: an ordinary ensemble, the controller at work."""
from __future__ import annotations

import json

import pytest

from rtllm.cli import main as cli_main
from rtllm.run.config import SampleConfig
from rtllm.store.ensemble import Ensemble


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_with_smile_cli(tiny_model_dir, train_file, tmp_path):
    out = tmp_path / "smile"
    code = cli_main(["sample", "--model", str(tiny_model_dir), "--train", str(train_file), "--out", str(out),
                     "--sampler", "smile", "--steps", "28", "--burn-in", "12", "--thin", "8",
                     "--batch-size", "4", "--seq-len", "16", "--dt", "0.05"])
    assert code == 0
    steps = [r for r in _log(out / "log-chain-000.jsonl") if r["type"] == "step"]
    assert len(steps) == 28 and all(r["loss"] == r["loss"] for r in steps)  # no tuning gradients, no nan
    manifest = json.loads((out / "ensemble.json").read_text())
    assert manifest["config"]["sampler"] == "smile"
    assert len(Ensemble(out).entries) == 2


@pytest.mark.parametrize("bad, match", [
    (dict(L=3.0), "SMILE never refreshes"), (dict(tune_phases=(2, 1, 1)), "SMILE never refreshes"),
    (dict(thin=3), "even"), (dict(layout="fp32-split"), "SMILE needs --layout fp32"),
])
def test_bad_smile_settings(bad, match, tmp_path):
    base = dict(model="m", train=("t",), out=str(tmp_path), steps=28, burn_in=12, thin=8, sampler="smile")
    with pytest.raises(ValueError, match=match):
        SampleConfig(**{**base, **bad})
