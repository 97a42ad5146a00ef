"""What --resume continues: leftovers cleaned, the same run however its paths are spelled, every
file of a sample covered by the manifest."""
from __future__ import annotations

import os
import shutil

import pytest

from refusal import sample_argv
from rtllm.cli import main as cli_main
from rtllm.run.recovery import settings_differ
from rtllm.store.ensemble import Ensemble


def test_settings_compare_resolved_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = {"model": "m", "train": ("t.txt",), "heldout": (), "init": None, "seed": 1}
    same = {"model": str(tmp_path / "m"), "train": (str(tmp_path / "x" / ".." / "t.txt"),),
            "heldout": (), "init": None, "seed": 1}
    assert settings_differ(saved, same) == []
    assert settings_differ(saved, {**same, "train": ("u.txt",), "seed": 2}) == ["seed", "train"]


def test_resume_with_absolute_paths_continues_and_cleans_leftovers(finished_run, tiny_model_dir,
                                                                   train_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    stale = run / "checkpoints" / f".chain-000.safetensors.tmp-{os.getpid() + 1}"
    stale.write_bytes(b"half a checkpoint")
    # The run was made with absolute paths; resume it spelled relative to the current directory.
    monkeypatch.chdir(tmp_path)
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731
    before = Ensemble(run).entries
    assert cli_main(sample_argv(rel(tiny_model_dir), rel(train_file), "run", "--resume")) == 0
    assert not stale.exists()
    assert Ensemble(run).entries == before  # the config now records the paths as spelled


def test_every_file_of_a_sample_is_hashed_and_checked(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    entries = Ensemble(run).entries
    # every file of the directory (config, weights, generation config and tokenizer files)
    assert all(sorted(e["files"]) == sorted(f.name for f in (run / e["path"]).iterdir()) for e in entries)
    assert all({"config.json", "model.safetensors", "tokenizer.json"} <= set(e["files"]) for e in entries)
    assert all(e["files"]["model.safetensors"] == e["sha256"] for e in entries)
    (run / entries[0]["path"] / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json has sha256 .* but the manifest records"):
        Ensemble(run)
