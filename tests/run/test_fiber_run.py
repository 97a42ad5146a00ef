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
