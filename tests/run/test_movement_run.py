"""A chain that does not move is an error, not an ensemble (issues 19 and 15.6), on a tiny GPT-2:
a hot tolerance moves; a huge --dt or a tiny --reject-threshold stops with one line; rtllm
evaluate refuses the copies a stopped run left unless --allow-degenerate."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rtllm.cli import main as cli_main
from rtllm.run.config import SampleConfig
from rtllm.run.sampling import SamplingRun
from rtllm.samplers import movement
from rtllm.store.ensemble import Ensemble
from rtllm.store.runlog import read_log
from tiny_gpt2 import save_trained_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_trained_tiny_model(tmp_path_factory.mktemp("model"))


def _args(model_dir, train_file, out, *extra) -> list[str]:
    return ["sample", "--model", str(model_dir), "--train", str(train_file), "--out", str(out),
            "--batch-size", "4", "--seq-len", "16", "--log-every", "4", "--seed", "1", *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_hot_tolerance_moves_with_the_default_guards(model_dir, train_file, tmp_path):
    """--loss-tolerance 2 (the issue's freezing case) with --dt auto and every guard at its
    default: under the 2% undo bound, no sample a copy of another."""
    cfg = SampleConfig(model=str(model_dir), train=(str(train_file),), out=str(tmp_path / "out"), steps=70,
                       burn_in=20, thin=10, batch_size=4, seq_len=16, log_every=10, seed=1, loss_tolerance=2.0,
                       dt_trial_steps=5)
    run = SamplingRun(cfg, log=lambda _m: None)
    run.run()
    log = read_log(tmp_path / "out" / "log-chain-000.jsonl")
    guards = next(r for r in log if r["type"] == "guards")
    assert guards["reject_threshold"] >= movement.UNDO_TOLERANCES * 2.0  # in the posterior's units
    sampling = [r for r in log if r["type"] == "step" and r["phase"] == "sampling"]
    undone = sum("rejected" in r for r in sampling)
    assert undone <= movement.DT_UNDO_BOUND * len(sampling)
    states = [sd["transformer.h.0.attn.c_attn.weight"] for _, sd in Ensemble(tmp_path / "out")]
    assert len(states) == 5 and all(not torch.equal(a, b) for a, b in zip(states, states[1:]))
    moves = [r["move"] / r["step_move"] for r in log if r["type"] == "sample_movement" and "move" in r]
    assert len(moves) == 4 and min(moves) > 1.0  # each sample at least one step from the last
    trials = [r for r in log if r["type"] == "dt_trial"]
    assert trials and all("jumps" in t for t in trials)


@pytest.mark.parametrize("flags", [["--dt", "1e6"], ["--dt", "5e-3", "--reject-threshold", "1e-5"]])
def test_a_chain_that_cannot_move_stops_with_one_line(model_dir, train_file, tmp_path, capsys, flags):
    """Huge --dt or tiny --reject-threshold: the undo fires on most steps, so the run stops in
    the burn-in with one line that names the way out, and exit != 0."""
    out = tmp_path / "out"
    code = cli_main(_args(model_dir, train_file, out, "--steps", "40", "--burn-in", "20", "--thin", "4", *flags))
    line = _one_line_error(capsys)
    assert code != 0 and "not moving" in line and "smaller --dt" in line
    guards = next(r for r in read_log(out / "log-chain-000.jsonl") if r["type"] == "guards")
    if "--reject-threshold" in flags:  # an explicit threshold wins over the auto one
        assert guards["reject_threshold"] == 1e-5
    assert not (out / "ensemble.json").exists() or not json.loads((out / "ensemble.json").read_text())["samples"]


def test_evaluate_refuses_copies_unless_allowed(model_dir, train_file, tmp_path, capsys):
    """A stuck run that got to write samples (burn-in too short for the window check): the run
    stops at its second sample (the copies), records no absurd loss, and evaluate refuses it."""
    ens = tmp_path / "ens"
    code = cli_main(_args(model_dir, train_file, ens, "--steps", "40", "--burn-in", "2", "--thin", "2",
                          "--dt", "1e6"))
    assert code != 0 and "copies" in _one_line_error(capsys)
    entries = Ensemble(ens).entries
    assert len(entries) >= 2
    start = next(r for r in read_log(ens / "log-chain-000.jsonl") if r["type"] == "guards")["start_loss"]
    assert all(e["masked"] or e["loss"] < start + 1.0 for e in entries)  # no 1e14 recorded as kept
    evaluate = ["evaluate", "--ensemble", str(ens), "--data", str(train_file), "--seq-len", "16",
                "--out", str(tmp_path / "eval")]
    assert cli_main(evaluate) != 0
    line = _one_line_error(capsys)
    assert "no ensemble" in line and "--allow-degenerate" in line
    assert not (tmp_path / "eval" / "summary.json").exists()
    assert cli_main(evaluate + ["--allow-degenerate"]) == 0
    assert (tmp_path / "eval" / "summary.json").exists()
