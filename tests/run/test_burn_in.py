"""--burn-in auto (rtllm/run/burn_in.py) and the stationarity verdict at the end of a run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rtllm.cli import main as cli_main
from rtllm.run.burn_in import MIN_POINTS, burn_in_done, max_burn_in
from rtllm.run.config import SampleConfig
from rtllm.run.sampling import SamplingRun
from rtllm.store.ensemble import Ensemble
from rtllm.store.runlog import read_log
from tiny_gpt2 import save_trained_tiny_model


def test_burn_in_waits_for_the_descent_to_end_and_is_bounded():
    """A loss that falls as exp(-t / 100) with noise 0.01 evaluated every 10 steps: not done
    while the window's drift is tens of noise sds; done once it is flat (t >= ~600); always
    done at the bound."""
    rng = np.random.default_rng(0)
    points = []
    ends = None
    for t in range(0, 2000, 10):
        points.append([t, 3 + np.exp(-t / 100) + rng.normal(0, 0.01)])
        if burn_in_done(points, t, steps=4000):
            ends = t
            break
    print(f"auto burn-in ended at {ends}")
    assert ends is not None and 350 <= ends <= 1500
    assert not burn_in_done(points[:MIN_POINTS], 60, steps=4000)
    assert burn_in_done([], max_burn_in(100) - 1, steps=100) and max_burn_in(100) == 50


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_trained_tiny_model(tmp_path_factory.mktemp("model"))


def test_auto_burn_in_run_ends_with_a_verdict_and_evaluate_stores_it(model_dir, train_file, tmp_path, capsys):
    cfg = SampleConfig(model=str(model_dir), train=(str(train_file),), out=str(tmp_path / "out"), steps=80,
                       burn_in="auto", thin=4, dt=2e-3, batch_size=4, seq_len=16, log_every=2, seed=1)
    said = []
    run = SamplingRun(cfg, log=said.append)
    run.run()
    burn_in = run.state["burn_in"]
    # the window (the later half of the evaluations, every 2 steps from 0) holds MIN_POINTS at 2 MIN_POINTS - 1
    assert (2 * MIN_POINTS - 2) * cfg.log_every + 1 <= burn_in <= max_burn_in(80)
    assert any(m.startswith("burn-in auto: ends after step") for m in said)
    log = read_log(tmp_path / "out" / "log-chain-000.jsonl")
    first_sampling = min(r["step"] for r in log if r["type"] == "step" and r["phase"] == "sampling")
    assert first_sampling == burn_in
    ens = Ensemble(tmp_path / "out")
    assert [e["step"] for e in ens.entries] == list(range(burn_in + 4, 81, 4))
    verdict = [r for r in log if r["type"] == "stationarity"]
    assert len(verdict) == 1 and any(m.startswith("stationarity: ") for m in said)
    assert verdict[0]["n_points"] > 0 and verdict[0]["undo_rate"] is not None

    assert cli_main(["evaluate", "--ensemble", str(tmp_path / "out"), "--data", str(train_file),
                     "--out", str(tmp_path / "eval"), "--seq-len", "16"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["stationarity"]["n_points"] == verdict[0]["n_points"]
    assert summary["stationarity"]["message"] in printed


def test_auto_burn_in_is_for_ray_tracing():
    with pytest.raises(ValueError, match="--burn-in auto works with --sampler ray"):
        SampleConfig(model="m", train=("t",), out="o", burn_in="auto", sampler="mclmc")
    with pytest.raises(ValueError, match="--burn-in must be an integer"):
        SampleConfig(model="m", train=("t",), out="o", burn_in="soon")
