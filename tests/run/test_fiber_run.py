"""`rtllm fiber` on the tiny GPT-2: two ordinary ensembles and the summary, few steps."""
from __future__ import annotations

import json

import pytest

from rtllm.cli import main as cli_main
from rtllm.run.fiber_config import FiberConfig
from rtllm.store.ensemble import Ensemble


def test_fiber_cli_writes_walk_and_generated_ensembles(tiny_model_dir, train_file, tmp_path):
    out = tmp_path / "fiber"
    args = ["fiber", "--model", str(tiny_model_dir), "--train", str(train_file), "--out", str(out),
            "--particles", "2", "--steps", "12", "--thin", "2", "--rank", "2", "--generated", "3",
            "--batch-size", "4", "--seq-len", "16", "--eval-sequences", "4", "--tolerance", "0.5"]
    assert cli_main(args) == 0
    summary = json.loads((out / "fiber.json").read_text())
    start = summary["start_loss"]
    walk = Ensemble(out / "walk")
    assert len(walk.entries) == summary["kept"] == sum(p["kept"] for p in summary["particles"]) > 2
    # Every kept iterate is within the tolerance of the start on the evaluation batch.
    assert all(e["heldout_loss"] <= start + 0.5 for e in walk.entries)
    generated = summary["generated"]
    assert len(Ensemble(out / "generated").entries) == 3 == len(generated["heldout_losses"])
    inside = sum(loss <= start + 0.5 for loss in generated["heldout_losses"])
    assert generated["inside_tolerance"] == inside and generated["fraction_inside"] == inside / 3
    assert summary["gradients"] == 24 or any(p["stopped_at"] for p in summary["particles"])
    # `rtllm evaluate` reads the generated ensemble unchanged.
    report = tmp_path / "report"
    assert cli_main(["evaluate", "--ensemble", str(out / "generated"), "--data", str(train_file),
                     "--seq-len", "16", "--out", str(report)]) == 0
    assert cli_main(args) == 2  # not empty: needs --overwrite
    assert cli_main(args + ["--overwrite", "--map", "mlp"]) == 0


@pytest.mark.parametrize("bad, match", [
    (dict(particles=0), "particles"), (dict(lr=-1.0), "lr"), (dict(map="flow"), "map"),
    (dict(generated=-1), "generated"),
])
def test_bad_fiber_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        FiberConfig(model="m", train=("t",), out="o", **bad)


def _fiber_args(model, train, out):
    return ["fiber", "--model", str(model), "--train", str(train), "--out", str(out), "--particles", "3",
            "--steps", "8", "--thin", "2", "--rank", "2", "--generated", "2", "--batch-size", "4",
            "--seq-len", "16", "--eval-sequences", "4", "--tolerance", "0.5"]


def _same_samples(a, b) -> bool:
    """The two runs' walk and generated samples hold equal weights, bit for bit (the files differ:
    their metadata names the output directory)."""
    import torch

    for name in ("walk", "generated"):
        ea, eb = list(Ensemble(a / name)), list(Ensemble(b / name))
        if len(ea) != len(eb) or not ea:
            return False
        for (_, sa), (_, sb) in zip(ea, eb):
            if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
                return False
    return True


def test_fiber_run_killed_mid_way_resumes_to_the_same_output(tiny_model_dir, train_file, tmp_path, monkeypatch,
                                                             capsys):
    from rtllm.run.fiber import FiberRun

    assert cli_main(_fiber_args(tiny_model_dir, train_file, tmp_path / "whole")) == 0
    walk_particle = FiberRun.walk_particle

    def dies_at_particle_2(self, i):
        if i == 2:
            raise RuntimeError("simulated crash")
        walk_particle(self, i)

    monkeypatch.setattr(FiberRun, "walk_particle", dies_at_particle_2)
    crashed = tmp_path / "crashed"
    assert cli_main(_fiber_args(tiny_model_dir, train_file, crashed)) != 0
    monkeypatch.setattr(FiberRun, "walk_particle", walk_particle)
    assert sorted(p.name for p in (crashed / "particles").iterdir()) == ["particle-000", "particle-001"]
    capsys.readouterr()
    assert cli_main(_fiber_args(tiny_model_dir, train_file, crashed) + ["--resume"]) == 0
    said = capsys.readouterr().out
    assert said.count("done in an earlier run") == 2 and "particle 2: kept" in said, said
    assert _same_samples(crashed, tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / "fiber.json").read_text())
    resumed = json.loads((crashed / "fiber.json").read_text())
    assert {**resumed, "settings": None} == {**whole, "settings": None}
    assert cli_main(_fiber_args(tiny_model_dir, train_file, crashed) + ["--resume", "--lr", "0.01"]) == 2


@pytest.mark.slow
def test_fiber_under_torchrun_equals_one_process(tiny_model_dir, train_file, tmp_path):
    """`torchrun --nproc-per-node 2 -m rtllm.cli fiber`: the particles shared out over 2 ranks
    give the ensembles of one process, bit for bit."""
    import os
    import subprocess
    import sys

    assert cli_main(_fiber_args(tiny_model_dir, train_file, tmp_path / "one")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "rtllm.cli",
           *_fiber_args(tiny_model_dir, train_file, tmp_path / "two"), "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _same_samples(tmp_path / "two", tmp_path / "one")
