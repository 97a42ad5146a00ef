"""`rtllm evaluate` publishes whole evaluations (issue 15, item 5) and reuses one whose inputs
are unchanged (issue 16, item 4): a killed run leaves the earlier evaluation intact, a rerun
with other data replaces every file, a bad --out fails before any computation."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_gpt2 import corpus_text
from transformers import AutoModelForCausalLM

from rtllm.evaluation import publish
from rtllm.evaluation.job import EvalJob, run_job
from rtllm.store.writer import SampleWriter, copy_tokenizer


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ens(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = root / "ens"
    with SampleWriter(out, model_config=model.config, named_tensors=model.state_dict(),
                      sample_dtype=None, run_config={"seed": 0}) as w:
        for i in range(2):
            with torch.no_grad():
                model.transformer.wte.weight.mul_(1.1)
            w.submit(index=i, chain=0, step=i, loss=3.0, heldout_loss=3.0)
    copy_tokenizer(tiny_model_dir, out)
    a, b = root / "a.txt", root / "b.txt"
    a.write_text(corpus_text(1200, offset=3000))
    b.write_text(corpus_text(4000, offset=20000))
    return {"ens": out, "a": a, "b": b}


def cli(ens, data, out, *extra):
    return [sys.executable, "-m", "rtllm.cli", "evaluate", "--ensemble", str(ens), "--data", str(data),
            "--seq-len", "16", "--device", "cpu", "--out", str(out), *extra]


def made_from(out):
    """The text file the published evaluation says it was made from, after checking that its
    files agree with each other."""
    marker = json.loads((out / publish.MARKER).read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert len((out / "tokens.jsonl").read_text().splitlines()) == summary["n_tokens"]
    assert sorted(marker["files"]) == sorted(p.name for p in out.iterdir() if p.name not in
                                             (publish.MARKER, "notes.txt") and not p.name.startswith("."))
    assert all((out / name).stat().st_size > 0 for name in marker["files"])
    (text,) = marker["inputs"]["texts"]
    return os.path.basename(text)


def test_killed_evaluate_keeps_the_old_one_and_a_rerun_with_other_data_replaces_it(ens, tmp_path):
    out = tmp_path / "eval"
    job = lambda data: EvalJob(ensemble=str(ens["ens"]), data=(str(data),), out=str(out), seq_len=16,  # noqa: E731
                               device="cpu")
    run_job(job(ens["a"]))
    (out / "notes.txt").write_text("the user's own file")
    assert made_from(out) == "a.txt"

    proc = subprocess.Popen(cli(ens["ens"], ens["b"], out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list(out.glob(publish.STAGING_PREFIX + "*")) and time.monotonic() < deadline:
        assert proc.poll() is None, "evaluate finished before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-computation: the staging directory exists
    proc.wait()
    assert made_from(out) == "a.txt"  # the earlier evaluation, whole

    said = []
    assert not run_job(job(ens["b"]), say=said.append).reused
    assert made_from(out) == "b.txt" and not any("already complete" in m for m in said)
    assert not list(out.glob(publish.STAGING_PREFIX + "*"))  # the killed run's staging is gone
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_a_rerun_with_the_same_inputs_reuses_the_evaluation(ens, tmp_path):
    job = EvalJob(ensemble=str(ens["ens"]), data=(str(ens["a"]),), out=str(tmp_path / "eval"),
                  seq_len=16, device="cpu")
    first = run_job(job)
    stamps = {p: p.stat().st_mtime_ns for p in first.paths.values()}
    said = []
    again = run_job(job, say=said.append)
    assert again.reused and again.summary == first.summary
    assert {p: p.stat().st_mtime_ns for p in first.paths.values()} == stamps  # nothing rewritten
    assert any("already complete" in m and "nothing to do" in m for m in said), said
    for changed in (EvalJob(**{**job.__dict__, "seq_len": 8}), EvalJob(**{**job.__dict__, "recompute": True})):
        assert not run_job(changed).reused


def test_a_changed_text_is_evaluated_again(ens, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text(ens["a"].read_text())
    job = EvalJob(ensemble=str(ens["ens"]), data=(str(data),), out=str(tmp_path / "eval"), seq_len=16,
                  device="cpu")
    n = run_job(job).summary["n_tokens"]
    data.write_text(ens["a"].read_text() + ens["b"].read_text())
    second = run_job(job)
    assert not second.reused and second.summary["n_tokens"] > n


def test_an_interrupted_publication_reads_as_incomplete_and_is_cleared(tmp_path, monkeypatch):
    out = tmp_path / "eval"
    staging = publish.begin(out)
    for name in ("summary.json", "tokens.jsonl", "tokens.html"):
        (staging / name).write_text("old")
    publish.publish(staging, out, "old-inputs", {})
    assert publish.completed(out, "old-inputs") is not None

    staging = publish.begin(out)
    (staging / "summary.json").write_text("new")
    (staging / "diagnostics.json").write_text("new")
    real_replace, calls = os.replace, []

    def dies_on_second_file(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for a kill between two renames
        real_replace(src, dst)

    monkeypatch.setattr(publish.os, "replace", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        publish.publish(staging, out, "new-inputs", {})
    monkeypatch.undo()
    assert publish.completed(out, "old-inputs") is None and publish.completed(out, "new-inputs") is None
    assert not (out / "tokens.jsonl").exists()  # no old file can pass for part of the new run

    staging = publish.begin(out)  # the next run clears the leftovers and publishes whole
    (staging / "summary.json").write_text("newer")
    publish.publish(staging, out, "newer-inputs", {})
    assert sorted(p.name for p in out.iterdir()) == [publish.MARKER, "summary.json"]
    assert publish.completed(out, "newer-inputs") == [out / "summary.json"]


def test_a_file_or_read_only_out_fails_before_any_computation(ens, tmp_path, monkeypatch):
    from rtllm.evaluation import streaming

    monkeypatch.setattr(streaming, "evaluate", lambda *a, **k: pytest.fail("evaluated into a bad --out"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, match in ((afile, "is a file"), (afile / "sub", "is a file")):
        with pytest.raises(ValueError, match=match):
            run_job(EvalJob(ensemble=str(ens["ens"]), data=(str(ens["a"]),), out=str(out)))
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make the directory refuse as a read-only mount would
        def refuse(self, *a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(publish.Path, "mkdir", refuse)
    with pytest.raises(ValueError, match="not writable"):
        run_job(EvalJob(ensemble=str(ens["ens"]), data=(str(ens["a"]),), out=str(read_only / "eval")))
    assert not list(read_only.iterdir())
