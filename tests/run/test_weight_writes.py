"""Every in-place write of the weights outside the sampler step waits for the writer's snapshot.

On CUDA a sample is copied on a side stream (SampleWriter.submit); a write of x, the compute
copy or v before wait_snapshot() could land in the middle of that copy and the sample would mix
two positions. On CPU the copy is synchronous, so the order of the calls is what can be tested.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from rtllm.run.config import SampleConfig
from rtllm.run.movement_watch import MovementWatch
from rtllm.run.sampling import SamplingRun
from rtllm.state.flat import Shard
from rtllm.store.writer import SampleWriter
from tiny_gpt2 import save_trained_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_trained_tiny_model(tmp_path_factory.mktemp("model"))


def _record_order(monkeypatch, run: SamplingRun) -> list[str]:
    """Calls in order: 'snapshot' (submit), 'wait' (wait_snapshot), 'write' (weights in place)."""
    events: list[str] = []

    def wrap(owner, name: str, tag: str) -> None:
        original = getattr(owner, name)

        def recorded(*args, **kwargs):
            events.append(tag)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, recorded)

    wrap(SampleWriter, "submit", "snapshot")
    wrap(SampleWriter, "wait_snapshot", "wait")
    wrap(Shard, "set_position", "write")
    wrap(type(run.sampler), "step", "write")
    wrap(type(run.sampler), "load_state_dict", "write")
    return events


def _unwaited_writes(events: list[str]) -> int:
    """Writes made while a snapshot was possibly in flight (after 'snapshot', before 'wait')."""
    in_flight, bad = True, 0  # be strict: treat the start as in flight too
    for e in events:
        if e == "snapshot":
            in_flight = True
        elif e == "wait":
            in_flight = False
        elif e == "write" and in_flight:
            bad += 1
    return bad


def _config(model_dir, train_file, out, **kw) -> SampleConfig:
    base = dict(model=str(model_dir), train=(str(train_file),), out=str(out), steps=12, burn_in=2,
                thin=2, dt=5e-3, batch_size=4, seq_len=16, log_every=4, seed=1)
    return SampleConfig(**{**base, **kw})


def test_undo_waits_for_the_snapshot(model_dir, train_file, tmp_path, monkeypatch):
    monkeypatch.setattr(SamplingRun, "_backup_fits", lambda self: True)
    # The tiny threshold undoes most steps, which the movement check rightly calls a stuck chain
    # (tests/run/test_movement_run.py): here only the order of the writes is under test.
    monkeypatch.setattr(MovementWatch, "after_sample", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(MovementWatch, "check", lambda self: None)
    run = SamplingRun(_config(model_dir, train_file, tmp_path / "out", reject_threshold=1e-4))
    events = _record_order(monkeypatch, run)
    undone = []
    original_undo = SamplingRun._undo_last_step
    monkeypatch.setattr(SamplingRun, "_undo_last_step",
                        lambda self: (undone.append(1), original_undo(self))[1])
    run.run()
    assert undone, "the tiny threshold should have undone steps"
    assert events.count("snapshot") > 0
    assert _unwaited_writes(events) == 0, events


def test_dt_trials_wait_for_the_snapshot(model_dir, train_file, tmp_path, monkeypatch):
    run = SamplingRun(_config(model_dir, train_file, tmp_path / "out", dt="auto", steps=2, burn_in=0,
                              thin=1, dt_trial_steps=2))
    events = _record_order(monkeypatch, run)
    run.run()
    assert events.count("write") > 2  # trial steps and restores, then the chain's own steps
    assert _unwaited_writes(events) == 0, events


def test_a_dt_trial_parks_the_state_on_disk_in_bounded_slices(model_dir, train_file, tmp_path, monkeypatch):
    """The trial's snapshot goes to a file and back: written one slice at a time, read back as
    views of the mapped file (at GPT-2 XL a host copy would be 11.6 GiB); the state comes back
    bit for bit and the file is gone after the trial."""
    import torch

    from rtllm.run import checkpoint, step_size
    from rtllm.run.checkpoint import cloned

    run = SamplingRun(_config(model_dir, train_file, tmp_path / "out", dt="auto", dt_trial_steps=2))
    run._calibrate_guards()
    before = cloned(run.sampler.state_dict())
    monkeypatch.setattr(checkpoint, "_CHUNK", 1024)  # bytes per slice
    moved, unmapped, real_to = [], [], torch.Tensor.to

    def spy(self, *args, **kwargs):
        moved.append(self.numel() * self.element_size())
        return real_to(self, *args, **kwargs)

    def save(path, state, **kwargs):
        torch.Tensor.to = spy  # only while the snapshot is written (the trial's steps move batches)
        try:
            checkpoint.save_checkpoint(path, state, **kwargs)
        finally:
            torch.Tensor.to = real_to

    def load(path):
        state = checkpoint.load_checkpoint(path)
        ranges = [tuple(int(a, 16) for a in line.split()[0].split("-"))
                  for line in open("/proc/self/maps") if line.split()[-1] == str(path)]
        checkpoint.map_tensors(state, lambda t: t.numel() and not any(
            lo <= t.data_ptr() < hi for lo, hi in ranges) and unmapped.append(t.shape))
        return state

    monkeypatch.setattr(step_size, "save_checkpoint", save)
    monkeypatch.setattr(step_size, "load_checkpoint", load)
    trial = run._trial(1e-2, run.state["start_loss"])
    assert trial.end_loss != trial.start_loss  # the trial did move the chain
    assert moved and max(moved) <= 1024, max(moved)
    assert not unmapped, unmapped  # the restore read views of the file, not host copies
    after = run.sampler.state_dict()
    for a, b in zip(before["position"][0] + before["velocity"][0], after["position"][0] + after["velocity"][0]):
        assert torch.equal(a, b)
    assert before["step"] == after["step"] and before["ln_luminosity"] == after["ln_luminosity"]
    assert not list(run.ckpt_path.parent.glob(".*")), "the snapshot file is removed after the trial"
