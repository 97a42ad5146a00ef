"""Multi-start ray tracing (rtllm sample --starts K = MILE's members, each a ray-tracing chain):
one merged ensemble, and `rtllm evaluate` splits its uncertainty into within and between chains."""
from __future__ import annotations

import json

import pytest

from rtllm.cli import main as cli_main
from rtllm.run.config import SampleConfig
from rtllm.run.members import MemberTraining
from rtllm.run.mile import MileConfig, run_mile
from rtllm.store.ensemble import Ensemble


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)


def test_two_starts_merge_and_evaluate_splits_within_and_between(tiny_model_dir, train_file, tmp_path, capsys):
    out = tmp_path / "starts"
    sampling = SampleConfig(model=str(tiny_model_dir), train=(str(train_file),), out=str(out), steps=12,
                            burn_in=4, thin=4, dt=2e-3, batch_size=4, seq_len=16, log_every=4, seed=2)
    said: list[str] = []
    run_mile(MileConfig(members=2, sampling=sampling, training=MemberTraining(lr=3e-3, max_steps=6, eval_every=3,
                                                                              batch_size=4)), log=said.append)
    assert any("each the start of a ray-tracing chain" in m for m in said)
    assert sum(m.startswith("[member") and "stationarity:" in m for m in said) == 2  # one verdict per chain
    ens = Ensemble(out)
    assert ens.chains == [0, 1] and len(ens.entries) == 4
    assert cli_main(["evaluate", "--ensemble", str(out), "--data", str(train_file), "--ood", str(train_file),
                     "--out", str(tmp_path / "eval"), "--seq-len", "16", "--max-samples", "4"]) == 0
    chains = json.loads((tmp_path / "eval" / "summary.json").read_text())["chains"]
    assert chains["n_chains"] == 2 and chains["mean_between"] > 0 and chains["mean_within"] > 0
    assert [c["chain"] for c in chains["per_chain"]] == [0, 1]
    assert "epistemic by chain" in capsys.readouterr().out


def test_starts_option_refuses_chain_and_init(tiny_model_dir, train_file, tmp_path, capsys):
    for extra in (["--chain", "1"], ["--init", str(tiny_model_dir)]):
        assert cli_main(["sample", "--model", str(tiny_model_dir), "--train", str(train_file), "--out",
                         str(tmp_path / "o"), "--starts", "2", *extra]) == 2
        assert "drop --chain and --init" in capsys.readouterr().err
