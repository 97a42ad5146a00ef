"""No code from an output directory or a model directory; only rtllm runs are resumed."""
from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

from refusal import assert_refused, sample_argv
from repo_paths import REPO

PACKAGE = REPO / "rtllm"


class _CreatesAFile:
    """Unpickling this calls pathlib.Path.touch on `target`: what a crafted checkpoint could do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_the_package_never_unpickles():
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in sorted(PACKAGE.rglob("*.py"))
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"\btorch\.load\(|\bpickle\.loads?\(|weights_only\s*=\s*False", line)]
    assert offenders == []


def test_a_crafted_pickle_checkpoint_runs_no_code(tiny_model_dir, train_file, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "run.json").write_text("{}")  # looks like an rtllm run
    target = tmp_path / "pwned"
    (out / "checkpoints" / "chain-000.pt").write_bytes(pickle.dumps(_CreatesAFile(target)))
    err = assert_refused(sample_argv(tiny_model_dir, train_file, out, "--resume"), tmp_path, capsys,
                         match="never unpickles")
    assert not target.exists(), err


def test_a_damaged_checkpoint_is_one_line(tiny_model_dir, train_file, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "run.json").write_text("{}")
    (out / "checkpoints" / "chain-000.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_refused(sample_argv(tiny_model_dir, train_file, out, "--resume"), tmp_path, capsys,
                   match="cannot be read")


def test_a_pickle_only_model_directory_is_refused_with_the_conversion(tiny_model_dir, train_file,
                                                                         tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    target = tmp_path / "pwned"
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_CreatesAFile(target)))
    assert_refused(sample_argv(model, train_file, tmp_path / "out"), tmp_path, capsys,
                   match="save_pretrained")
    assert not target.exists()


def test_resume_into_a_folder_of_user_files_changes_nothing(tiny_model_dir, train_file, tmp_path, capsys):
    user = tmp_path / "someone-elses-model"
    user.mkdir()
    (user / "tokenizer.json").write_text(json.dumps({"precious": True}))
    (user / "notes.txt").write_text("do not touch")
    assert_refused(sample_argv(tiny_model_dir, train_file, user, "--resume"), tmp_path, capsys,
                   match="not an rtllm run")
    assert_refused(sample_argv(tiny_model_dir, train_file, user, "--overwrite"), tmp_path, capsys,
                   match="holds no rtllm run")
