"""Every bad input of issue 15: one line (or two) on stderr, exit != 0, no traceback, and nothing
written or changed under the test's folder (which holds --out and every input)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refusal import assert_refused, sample_argv
from rtllm.cli import main as cli_main


def _model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    return model


def _edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, named", [
    ({"n_layer": 3}, "missing tensor(s) (transformer.h.2."),
    ({"n_embd": 64, "n_head": 2}, "tensor shapes differ"),
])
def test_a_config_that_does_not_match_the_weights_is_refused(tiny_model_dir, train_file, tmp_path,
                                                             capsys, changes, named):
    model = _model_copy(tiny_model_dir, tmp_path)
    _edit_config(model, **changes)
    assert_refused(sample_argv(model, train_file, tmp_path / "out"), tmp_path, capsys, match=named)


def test_evaluate_baseline_with_mismatched_weights_is_refused(tiny_model_dir, finished_run, train_file,
                                                             tmp_path, capsys):
    model = _model_copy(tiny_model_dir, tmp_path)
    _edit_config(model, n_layer=3)
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert_refused(["evaluate", "--ensemble", str(run), "--data", str(train_file), "--baseline",
                    str(model), "--out", str(tmp_path / "eval"), "--device", "cpu"], tmp_path, capsys,
                   match="does not match its weights")


@pytest.mark.parametrize("content, message", [
    (b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)) * 4, "binary file"),
    (b"plain\x00text with a NUL byte\n" * 50, "binary file"),
    ("Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.\n".encode("latin-1") * 200, "--encoding"),
])
def test_binary_or_non_utf8_training_text_is_refused(tiny_model_dir, tmp_path, capsys, content, message):
    text = tmp_path / "train.bin"
    text.write_bytes(content)
    assert_refused(sample_argv(tiny_model_dir, text, tmp_path / "out"), tmp_path, capsys, match=message)


def test_a_truncated_model_safetensors_is_one_line(tiny_model_dir, train_file, tmp_path, capsys):
    model = _model_copy(tiny_model_dir, tmp_path)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(sample_argv(model, train_file, tmp_path / "out"), tmp_path, capsys,
                   match="cannot load the weights")


def test_a_tokenizer_larger_than_the_embedding_is_one_line(tiny_model_dir, train_file, tmp_path, capsys):
    from transformers import AutoTokenizer

    model = _model_copy(tiny_model_dir, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(8)])
    tokenizer.save_pretrained(model)
    assert_refused(sample_argv(model, train_file, tmp_path / "out"), tmp_path, capsys,
                   match="embedding has")


def test_absurd_step_counts_are_one_line(tiny_model_dir, train_file, tmp_path, capsys):
    argv = sample_argv(tiny_model_dir, train_file, tmp_path / "out")
    argv[argv.index("--steps") + 1] = "99999999999999999999999"
    assert_refused(argv, tmp_path, capsys, match="at most 2**63 - 1")


def test_plan_refuses_a_negative_dt(capsys, tmp_path):
    assert_refused(["plan", "--model", "gpt2", "--dt", "-1"], tmp_path, capsys, match="> 0")


def test_a_manifest_index_that_is_a_string_is_one_line(finished_run, train_file, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    manifest = json.loads((run / "ensemble.json").read_text())
    manifest["samples"][0]["index"] = "0"
    (run / "ensemble.json").write_text(json.dumps(manifest))
    assert_refused(["evaluate", "--ensemble", str(run), "--data", str(train_file),
                    "--out", str(tmp_path / "eval"), "--device", "cpu"], tmp_path, capsys,
                   match="not an integer")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway")
def test_an_unreadable_model_file_says_permission_denied(tiny_model_dir, train_file, tmp_path, capsys):
    model = _model_copy(tiny_model_dir, tmp_path)
    (model / "model.safetensors").chmod(0)
    assert_refused(sample_argv(model, train_file, tmp_path / "out"), tmp_path, capsys,
                   match="permission denied")


def test_an_unreadable_model_file_is_named_even_for_root(tiny_model_dir, train_file, tmp_path, capsys,
                                                         monkeypatch):
    # os.access is what the check asks; as root a real mode-000 file would still be readable.
    model = _model_copy(tiny_model_dir, tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p).name != "model.safetensors"
                        and real_access(p, mode))
    assert_refused(sample_argv(model, train_file, tmp_path / "out"), tmp_path, capsys,
                   match="model.safetensors is not readable (permission denied)")


def test_resume_names_samples_it_cannot_recreate(finished_run, tiny_model_dir, train_file, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "samples" / "000000" / "model.safetensors").unlink()
    (run / "samples" / "000001" / "config.json").write_text("{}")  # covered by the manifest too
    err = assert_refused(sample_argv(tiny_model_dir, train_file, run, "--resume"), tmp_path, capsys,
                         match="cannot re-create sample(s) 0")
    assert "samples/000000/model.safetensors is missing" in err
    assert "samples/000001/config.json changed" in err


def test_a_directory_locked_by_another_process_names_its_pid(tiny_model_dir, train_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rtllm.store.lock import DirectoryLock; "
         "lock = DirectoryLock(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert_refused(sample_argv(tiny_model_dir, train_file, out), tmp_path, capsys,
                       match=f"in use by another rtllm run (PID {holder.pid})")
    finally:
        holder.kill()
        holder.wait()


def test_disk_full_during_a_checkpoint_write_is_one_line(tiny_model_dir, train_file, tmp_path, capsys,
                                                          monkeypatch):
    import errno

    from rtllm.run import checkpoint

    def full(f, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_sliced", full)
    out = tmp_path / "out"
    capsys.readouterr()
    rc = cli_main(sample_argv(tiny_model_dir, train_file, out, "--checkpoint-every", "2"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "the disk is full" in err and "--resume" in err
    assert not list((out / "checkpoints").glob(".*tmp*"))  # the torn temporary was removed


def test_a_second_run_on_the_out_of_a_live_run_is_refused(tiny_model_dir, train_file, tmp_path, capsys):
    from refusal import run_config
    from rtllm.run.sampling import SamplingRun

    out = tmp_path / "out"
    first = SamplingRun(run_config(tiny_model_dir, train_file, out), log=lambda _: None)  # holds the lock
    try:
        for extra in ((), ("--resume",), ("--overwrite",), ("--seed", "9", "--overwrite")):
            assert_refused(sample_argv(tiny_model_dir, train_file, out, *extra), tmp_path, capsys,
                           match=f"in use by another rtllm run (PID {os.getpid()})")
    finally:
        first.run()  # finishes and releases
    assert not (out / ".rtllm.lock").exists()
