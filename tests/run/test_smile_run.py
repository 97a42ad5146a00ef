"""`rtllm sample --sampler smile` on the tiny GPT-2: an ordinary ensemble, the controller at work."""
from __future__ import annotations

import json

import pytest

from rtllm.cli import main as cli_main
from rtllm.run.config import SampleConfig
from rtllm.store.ensemble import Ensemble


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("precondition", [False, True])
def test_sample_with_smile_cli(tiny_model_dir, train_file, tmp_path, precondition):
    out = tmp_path / "smile"
    code = cli_main(["sample", "--model", str(tiny_model_dir), "--train", str(train_file), "--out", str(out),
                     "--sampler", "smile", "--steps", "28", "--burn-in", "12", "--thin", "8",
                     "--batch-size", "4", "--seq-len", "16", "--dt", "0.05"]
                    + (["--precondition"] if precondition else []))
    assert code == 0
    steps = [r for r in _log(out / "log-chain-000.jsonl") if r["type"] == "step"]
    assert len(steps) == 28 and all(r["loss"] == r["loss"] for r in steps)  # no tuning gradients, no nan
    manifest = json.loads((out / "ensemble.json").read_text())
    assert manifest["config"]["sampler"] == "smile"
    assert manifest["config"]["precondition"] is precondition
    assert manifest["config"]["precondition_clip"] == "relative"  # the default (docs/smile.md)
    assert len(Ensemble(out).entries) == 2


@pytest.mark.parametrize("bad, match", [
    (dict(L=3.0), "SMILE never refreshes"), (dict(tune_phases=(2, 1, 1)), "SMILE never refreshes"),
    (dict(thin=3), "even"), (dict(layout="fp32-split"), "SMILE needs --layout fp32"),
    (dict(sampler="mclmc", precondition=True), "needs --sampler smile"),
    (dict(precondition=True, shard_state=True), "without --shard-state"),
    (dict(precondition=True, precondition_clip="none"), "must be relative or absolute"),
])
def test_bad_smile_settings(bad, match, tmp_path):
    base = dict(model="m", train=("t",), out=str(tmp_path), steps=28, burn_in=12, thin=8, sampler="smile")
    with pytest.raises(ValueError, match=match):
        SampleConfig(**{**base, **bad})


def test_psmile_run_resumes_after_a_crash_to_the_same_samples(tiny_model_dir, train_file, tmp_path, crash_on_call):
    """A pSMILE run that dies mid-way (after a checkpoint) and is resumed writes the samples of
    an uninterrupted run, bit for bit: the preconditioner's statistics are in the checkpoint."""
    from rtllm.samplers.smile import SMILE

    args = ["sample", "--model", str(tiny_model_dir), "--train", str(train_file), "--sampler", "smile",
            "--precondition", "--steps", "24", "--burn-in", "4", "--thin", "4", "--batch-size", "4",
            "--seq-len", "16", "--dt", "0.05", "--checkpoint-every", "6", "--seed", "3"]
    assert cli_main(args + ["--out", str(tmp_path / "whole")]) == 0
    put_back = crash_on_call(SMILE, "step", 15)
    assert cli_main(args + ["--out", str(tmp_path / "crashed")]) != 0  # the CLI reports the error
    put_back()
    assert (tmp_path / "crashed" / "checkpoints" / "chain-000.safetensors").exists()
    assert cli_main(args + ["--out", str(tmp_path / "crashed"), "--resume"]) == 0
    whole, resumed = Ensemble(tmp_path / "whole").entries, Ensemble(tmp_path / "crashed").entries
    assert len(whole) == 5 and [e["sha256"] for e in whole] == [e["sha256"] for e in resumed]
