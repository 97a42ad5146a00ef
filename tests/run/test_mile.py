"""MILE end to end on the tiny GPT-2: members, tuned MCLMC chains, one merged ensemble; and
`rtllm sample --sampler mclmc` on its own."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rtllm.run.merge import chain_dir
from rtllm.cli import main as cli_main
from rtllm.run.config import SampleConfig
from rtllm.store.ensemble import Ensemble
from rtllm.run.members import MemberTraining
from rtllm.run.mile import MileConfig, member_dir, run_mile
from rtllm.run.sampling import sample
from tiny_gpt2 import corpus_text

# burn-in 20 gradients = tuning phases 6/2/2 full steps; then 8 gradients, thin 4: 2 samples.
SAMPLING = dict(steps=28, burn_in=20, thin=4, batch_size=4, seq_len=16, log_every=4, seed=3,
                sampler="mclmc", tune_phases=(6, 2, 2))


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(corpus_text(12_000, offset=10_000))
    return path


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mile_members_chains_and_merged_ensemble(tiny_model_dir, train_file, tmp_path):
    out = tmp_path / "mile"
    cfg = MileConfig(members=2, sampling=SampleConfig(model=str(tiny_model_dir), train=(str(train_file),),
                                                      out=str(out), **SAMPLING),
                     training=MemberTraining(lr=3e-3, max_steps=10, eval_every=5, batch_size=4))
    said: list[str] = []
    run_mile(cfg, log=said.append)
    assert any("minibatch gradients" in m for m in said)  # the documented deviation is stated
    ens = Ensemble(out)
    assert ens.chains == [0, 1]
    entries = ens.entries
    assert len(entries) == 4 and sorted({e["chain"] for e in entries}) == [0, 1]
    for k in (0, 1):
        run = json.loads((chain_dir(out, k) / "ensemble.json").read_text())["config"]
        assert run["sampler"] == "mclmc" and run["init"] == str(member_dir(out, k))
        assert run["dt"] > 0 and run["L"] > 0  # tuned step size and L are recorded per chain
        tune = [r for r in _log(chain_dir(out, k) / f"log-chain-{k:03d}.jsonl") if r["type"] == "mclmc_tune"]
        assert len(tune) == 1 and tune[0]["phases"] == [6, 2, 2]
    # The two members differ (seeds, data orders), so do their chains' samples.
    first = {e["chain"]: e["index"] for e in reversed(entries)}
    a, b = ens.state_dict(first[0]), ens.state_dict(first[1])
    assert any((a[n] != b[n]).any() for n in a)
    # A second run reuses the members and the finished chains.
    stamp = (member_dir(out, 0) / "model.safetensors").stat().st_mtime_ns
    run_mile(cfg, resume=True, log=said.append)
    assert (member_dir(out, 0) / "model.safetensors").stat().st_mtime_ns == stamp
    assert any("reusing" in m for m in said)


def test_sample_with_mclmc_cli(tiny_model_dir, train_file, tmp_path):
    out = tmp_path / "one"
    code = cli_main(["sample", "--model", str(tiny_model_dir), "--train", str(train_file), "--out", str(out),
                     "--sampler", "mclmc", "--steps", "24", "--burn-in", "16", "--thin", "4",
                     "--batch-size", "4", "--seq-len", "16", "--tune-phases", "4", "2", "2"])
    assert code == 0
    steps = [r for r in _log(out / "log-chain-000.jsonl") if r["type"] == "step"]
    assert len(steps) == 8  # 16 burn-in gradients went to the tuner
    # Both ends of each tuned step are scored on one minibatch: with S ~ D/0.1 a cross-batch
    # energy would read ~1e4 per dimension and drive the step size to ~0 (it did, before).
    tune = [r for r in _log(out / "log-chain-000.jsonl") if r["type"] == "mclmc_tune"][0]
    assert tune["step_size"] > 1e-4 and tune["energy_var_per_dim_end"] < 100
    assert len(Ensemble(out).entries) == 2


@pytest.mark.parametrize("bad, match", [
    (dict(burn_in=21), "even"), (dict(thin=3), "even"), (dict(L=-1.0), "L"),
    (dict(tune_phases=(20, 2, 2)), "more than"), (dict(sampler="hmc"), "sampler"),
])
def test_bad_mclmc_settings(bad, match, tmp_path):
    base = dict(model="m", train=("t",), out=str(tmp_path), **{**SAMPLING, **bad})
    with pytest.raises(ValueError, match=match):
        SampleConfig(**base)


def test_bad_member_count(tmp_path):
    s = SampleConfig(model="m", train=("t",), out=str(tmp_path), **SAMPLING)
    with pytest.raises(ValueError, match="members"):
        MileConfig(members=0, sampling=s)


def test_mclmc_divergence_in_the_loop_keeps_every_sample(tiny_model_dir, train_file, tmp_path, monkeypatch):
    """A divergence at a step's start call restarts the full step one gradient later, off the even
    grid: the samples due then wait for their step's end instead of being lost or crashing."""
    from rtllm.run.sampling import SamplingRun

    original = SamplingRun._loss_and_grad_on_device

    def nan_at_20(self, cursor):
        loss, tokens = original(self, cursor)
        return (loss * float("nan") if self.state["step"] == 20 else loss), tokens

    monkeypatch.setattr(SamplingRun, "_loss_and_grad_on_device", nan_at_20)
    out = tmp_path / "div"
    cfg = SampleConfig(model=str(tiny_model_dir), train=(str(train_file),), out=str(out), **SAMPLING)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        sample(cfg, log=lambda _m: None)
    entries = Ensemble(out).entries
    assert [e["index"] for e in entries] == [0, 1]
    assert [e["step"] for e in entries] == [25, 29]  # one gradient later than 24 and 28
    steps = [r for r in _log(out / "log-chain-000.jsonl") if r["type"] == "step"]
    assert len(steps) == 9  # 8 sampling gradients + the one the last sample waited for


def test_split_layout_cannot_export_fp32_master_weights(tmp_path):
    with pytest.raises(ValueError, match="sample-dtype fp32 with --layout fp32-split"):
        SampleConfig(model="m", train=("t",), out=str(tmp_path), layout="fp32-split", sample_dtype="fp32")


def test_given_L_is_kept_and_only_the_step_size_is_tuned(tiny_model_dir, train_file, tmp_path):
    out = tmp_path / "fixedL"
    cfg = SampleConfig(model=str(tiny_model_dir), train=(str(train_file),), out=str(out),
                       **{**SAMPLING, "L": 7.5})
    sample(cfg, log=lambda _m: None)
    tune = [r for r in _log(out / "log-chain-000.jsonl") if r["type"] == "mclmc_tune"][0]
    assert tune["L"] == 7.5 and tune["phases"] == [6, 0, 0]
    assert json.loads((out / "ensemble.json").read_text())["config"]["L"] == 7.5
