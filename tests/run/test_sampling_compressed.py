"""rtllm sample --sample-format delta8 / nf4: a run writes compressed samples that read back."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rtllm.cli import main as cli_main
from rtllm.run.config import SampleConfig
from rtllm.run.sampling import SamplingRun
from rtllm.store.delta import START, sample_disk_bytes
from rtllm.store.ensemble import Ensemble
from rtllm.store.manifest import WEIGHTS


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("fmt", ["delta8", "nf4"])
def test_a_run_writes_compressed_samples(tiny_model_dir, train_file, tmp_path, fmt):
    cfg = SampleConfig(model=str(tiny_model_dir), train=(str(train_file),), out=str(tmp_path / "out"),
                       steps=12, burn_in=4, thin=4, dt=2e-3, batch_size=4, seq_len=16, seed=1,
                       sample_format=fmt)
    run = SamplingRun(cfg)
    run.run()
    ens = Ensemble(tmp_path / "out")
    assert len(ens) == 2 and ens.config["sample_format"] == fmt
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    stored_start = load_file(tmp_path / "out" / START / WEIGHTS)
    assert all(torch.equal(v, start[k]) for k, v in stored_start.items())  # the weights it began at
    last = ens.entries[-1]
    final = ens.state_dict(last["index"])  # the run ended on its last sample
    live = run.model.state_dict()
    worst = max((final[k] - live[k]).abs().max().item() for k in final)
    assert 0 < worst == pytest.approx(last["max_abs_error"], rel=1e-6)


def test_cli_option_and_bad_value(tiny_model_dir, train_file, tmp_path, capsys):
    base = ["sample", "--model", str(tiny_model_dir), "--train", str(train_file), "--steps", "8",
            "--burn-in", "4", "--thin", "4", "--dt", "2e-3", "--batch-size", "4", "--seq-len", "16"]
    assert cli_main(base + ["--out", str(tmp_path / "a"), "--sample-format", "delta8"]) == 0
    assert Ensemble(tmp_path / "a").entries[0]["format"] == "delta8"
    with pytest.raises(SystemExit):
        cli_main(base + ["--out", str(tmp_path / "b"), "--sample-format", "int3"])
    with pytest.raises(ValueError, match="sample-format"):
        SampleConfig(model="m", train=("t",), out="o", sample_format="int3")


def test_merged_compressed_chains_read_back(tiny_model_dir, train_file, tmp_path, monkeypatch):
    from rtllm.run.chains import run_sample
    from rtllm.run.merge import merge

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "ens"
    for chain in (0, 1):
        cfg = SampleConfig(model=str(tiny_model_dir), train=(str(train_file),), out=str(out), steps=8,
                           burn_in=4, thin=4, dt=2e-3, batch_size=4, seq_len=16, seed=1,
                           sample_format="delta8")
        run_sample(cfg, first_chain=chain)
    merge(out)
    ens = Ensemble(out)
    assert ens.chains == [0, 1] and len({e["start"] for e in ens.entries}) == 2  # a start per chain
    states = [sd for _, sd in ens]
    assert len(states) == 2 and not torch.equal(states[0]["transformer.h.0.mlp.c_fc.weight"],
                                                states[1]["transformer.h.0.mlp.c_fc.weight"])


class _Measured(Exception):
    pass


def test_the_disk_check_counts_compressed_samples(tiny_model_dir, train_file, tmp_path, monkeypatch):
    from rtllm.run import sampling

    def cfg(fmt, out):
        return SampleConfig(model=str(tiny_model_dir), train=(str(train_file),), out=str(tmp_path / out),
                            steps=12, burn_in=4, thin=4, dt=2e-3, batch_size=4, seq_len=16, seed=1,
                            sample_format=fmt)

    needs = {}

    def measured(out_dir, need, what):  # what the check asks for, then stop before any writing
        needs[Path(out_dir).name] = need
        raise _Measured(what)

    with monkeypatch.context() as m:
        m.setattr(sampling, "check_free_disk", measured)
        for fmt in ("safetensors", "delta8"):
            with pytest.raises(_Measured):
                SamplingRun(cfg(fmt, fmt))
    run = SamplingRun(cfg("delta8", "run"))
    run.run()
    per, once = sample_disk_bytes(run.model, "delta8")
    plain, _ = sample_disk_bytes(run.model, "safetensors")
    assert once == plain  # the start, once, in the samples' dtype
    # The estimate is not below what a sample takes on disk, and not far above it.
    written = [(tmp_path / "run" / e["path"] / e["file"]).stat().st_size for e in Ensemble(tmp_path / "run").entries]
    assert len(written) == 2 and max(written) <= per <= 1.25 * min(written)
    # Per sample the compressed run asks for its codes, not a whole fp32 sample: 2 samples + 1
    # being written, plus the start once; nf4 about half the codes of delta8.
    assert needs["safetensors"] - needs["delta8"] == 3 * (plain - per) - plain
    assert 0.5 * per < sample_disk_bytes(run.model, "nf4")[0] < 0.7 * per
