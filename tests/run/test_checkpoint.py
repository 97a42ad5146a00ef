"""Checkpoints: safetensors + JSON, exact round trip, bounded host slices, atomic, no pickle."""
from __future__ import annotations

import errno
import json
import math
import struct

import pytest
import torch

from rtllm.run import checkpoint
from rtllm.run.checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"config": {"train": ("a.txt", "b.txt"), "dt": "auto", "seed": 3},
            "state": {"step": 7, "dt": 1 / 3, "prev_loss": math.inf, "flagged": [2, 5], "L": None},
            "sampler": {"position": [[torch.randn(1025, generator=g)]],
                        "velocity": [[torch.randn(17, generator=g).bfloat16()]],
                        "by_int": {0: torch.arange(5)}, "ln_luminosity": -1e-300},
            "backup": [(torch.randn(3, 4, generator=g), torch.zeros(0))]}


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert type(b) is dict and list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert type(a) is type(b) and a == b


def test_round_trip_keeps_values_types_and_bits(tmp_path):
    state = _state()
    save_checkpoint(tmp_path / "c.safetensors", state)
    _assert_same(state, load_checkpoint(tmp_path / "c.safetensors"))


def test_the_file_is_plain_safetensors_with_json_metadata(tmp_path):
    from safetensors import safe_open

    save_checkpoint(tmp_path / "c.safetensors", _state())
    with safe_open(tmp_path / "c.safetensors", framework="pt") as f:
        meta = json.loads(f.metadata()["rtllm_checkpoint"])
        assert meta["version"] == checkpoint.CHECKPOINT_VERSION and len(list(f.keys())) == 5
    assert (tmp_path / "c.safetensors").read_bytes()[8:9] == b"{"  # a JSON header, not a pickle


def test_tensors_reach_the_host_in_bounded_slices(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_CHUNK", 256)  # bytes: 64 floats per slice
    seen = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        seen.append(self.numel() * self.element_size())
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    state = _state()
    save_checkpoint(tmp_path / "c.safetensors", state)
    monkeypatch.undo()
    assert seen and max(seen) <= 256
    _assert_same(state, load_checkpoint(tmp_path / "c.safetensors"))


def test_disk_full_keeps_the_old_checkpoint_and_says_what_to_do(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, _state())
    before = path.read_bytes()

    def full(f, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_sliced", full)
    with pytest.raises(OSError, match="disk is full .*previous checkpoint is intact.*--resume"):
        save_checkpoint(path, _state())
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("data", [b"", b"\x00" * 7, struct.pack("<Q", 2) + b"{}",
                                  struct.pack("<Q", 10**12) + b"{"])
def test_damaged_checkpoints_are_value_errors(tmp_path, data):
    (tmp_path / "c.safetensors").write_bytes(data)
    with pytest.raises(ValueError, match="checkpoint .*(cannot be read|holds no rtllm state)"):
        load_checkpoint(tmp_path / "c.safetensors")


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path):
    (tmp_path / ".chain-000.safetensors.tmp-123").write_bytes(b"half")
    (tmp_path / ".chain-001.pt.tmp-99").write_bytes(b"half")
    (tmp_path / "chain-000.safetensors").write_bytes(b"keep")
    assert len(remove_stale_temporaries(tmp_path)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["chain-000.safetensors"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_tensors_round_trip_through_host_slices(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_CHUNK", 1000)  # not a multiple of 4 or 2: uneven slices
    state = checkpoint.map_tensors(_state(), lambda t: t.cuda())
    save_checkpoint(tmp_path / "c.safetensors", state)
    _assert_same(checkpoint.map_tensors(state, torch.Tensor.cpu), load_checkpoint(tmp_path / "c.safetensors"))


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """The address ranges where this process maps `path` (/proc/self/maps)."""
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_a_read_maps_the_file_instead_of_copying_the_state_to_the_host(tmp_path):
    path = tmp_path / "c.safetensors"
    state = _state()
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    ranges = _mapped_ranges(path)
    tensors = []
    checkpoint.map_tensors(loaded, lambda t: tensors.append(t) or t)
    big = [t for t in tensors if t.numel()]
    assert ranges and len(big) == 4
    for t in big:  # every byte of every tensor lies in the mapping: no host copy was made
        first, last = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        assert any(lo <= first and last <= hi for lo, hi in ranges), (t.shape, ranges)
    loaded["sampler"]["position"][0][0].add_(1.0)  # copy-on-write: the file stays as written
    _assert_same(state, load_checkpoint(path))
    path.unlink()  # the views outlive the file (the mapping holds it)
    assert torch.equal(loaded["backup"][0][0], state["backup"][0][0])


def test_a_split_layout_run_resumes_after_a_crash_to_the_same_samples(tiny_model_dir, train_file, tmp_path,
                                                                      crash_on_call):
    """--layout fp32-split: the checkpoint holds the position's two planes (nothing joined on the
    device), and a run that dies after one resumes to the samples of an uninterrupted run."""
    from rtllm.cli import main as cli_main
    from rtllm.samplers.optimizers import RayTracer
    from rtllm.store.ensemble import Ensemble

    args = ["sample", "--model", str(tiny_model_dir), "--train", str(train_file), "--layout", "fp32-split",
            "--steps", "20", "--burn-in", "4", "--thin", "4", "--batch-size", "4", "--seq-len", "16",
            "--dt", "2e-3", "--checkpoint-every", "5", "--seed", "3"]
    assert cli_main(args + ["--out", str(tmp_path / "whole")]) == 0
    put_back = crash_on_call(RayTracer, "step", 13)
    assert cli_main(args + ["--out", str(tmp_path / "crashed")]) != 0
    put_back()
    saved = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "chain-000.safetensors")
    planes = saved["sampler"]["position"][0][0]
    assert planes["hi"].dtype == torch.bfloat16 and planes["lo"].dtype == torch.int16
    assert cli_main(args + ["--out", str(tmp_path / "crashed"), "--resume"]) == 0
    whole, resumed = Ensemble(tmp_path / "whole").entries, Ensemble(tmp_path / "crashed").entries
    assert len(whole) == 4 and [e["sha256"] for e in whole] == [e["sha256"] for e in resumed]
