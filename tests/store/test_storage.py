"""Sample storage: HF-loadable sample dirs, snapshot at submit, atomic writes, disk errors."""
import errno
import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import rtllm
from rtllm.store import writer as storage
from rtllm.store.writer import (Manifest, SampleWriteError, SampleWriter, atomic_write_bytes,
                           check_free_disk, copy_tokenizer, estimate_run_disk, sha256_file)

RUN_CONFIG = {"sampler": "ray", "dt": 1e-3, "seed": 0}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_gpt2(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).to(dtype).eval()  # eval: dropout off, logits deterministic


TOKENS = torch.arange(12).reshape(2, 6) % 64


class Sampled:
    """A tiny GPT-2 whose parameters are views of a RayTracer's flat buffers."""

    def __init__(self, dtype=torch.float32):
        self.model = tiny_gpt2(dtype)
        self.opt = rtllm.RayTracer(self.model.parameters(), dt=1e-2, seed=1)
        self.step()

    def step(self):
        self.opt.zero_grad()
        self.model(TOKENS, labels=TOKENS).loss.backward()
        self.opt.step()

    @torch.no_grad()
    def logits(self):
        return self.model(TOKENS).logits.clone()

    def named_tensors(self):
        return self.model.state_dict(keep_vars=True)


def writer(out, sampled, sample_dtype=None, **kwargs):
    return SampleWriter(out, model_config=sampled.model.config,
                        named_tensors=sampled.named_tensors(), sample_dtype=sample_dtype,
                        run_config=kwargs.pop("run_config", RUN_CONFIG), **kwargs)


def write_samples(out, sampled, n=3, **kwargs):
    """Submit n samples, stepping the weights right after each submit; logits at submit time."""
    logits = []
    with writer(out, sampled, **kwargs) as w:
        for i in range(n):
            logits.append(sampled.logits())
            w.submit(index=i, chain=0, step=10 * i, loss=1.5 + i, heldout_loss=None)
            w.wait_snapshot()
            sampled.step()  # changes the weights while the sample may still be in flight
    return logits, w.close()


def load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def temp_leftovers(out):
    return [p for p in Path(out).rglob("*") if p.name.startswith(".tmp-")]


def test_parameters_are_buffer_views():
    sampled = Sampled()
    storages = {p.untyped_storage().data_ptr() for p in sampled.model.parameters()}
    assert len(storages) == 1  # the flat shard: storage sharing alone does not mean tied


def test_each_sample_loads_with_from_pretrained_and_gives_the_logits_at_submit(tmp_path):
    sampled = Sampled()
    logits, entries = write_samples(tmp_path, sampled)
    assert [e["index"] for e in entries] == [0, 1, 2]
    assert not torch.equal(logits[0], logits[1])  # the weights really moved between samples
    for i, expected in enumerate(logits):
        model = load(tmp_path / "samples" / f"{i:06d}")
        with torch.no_grad():
            torch.testing.assert_close(model(TOKENS).logits, expected, rtol=0, atol=0)
    assert temp_leftovers(tmp_path) == []


def test_manifest_lists_verified_hashes_and_string_metadata(tmp_path):
    _, entries = write_samples(tmp_path, Sampled())
    manifest = json.loads((tmp_path / "ensemble.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["config"] == RUN_CONFIG
    assert manifest["samples"] == entries
    for e in entries:
        path = tmp_path / e["path"] / "model.safetensors"
        assert e["sha256"] == sha256_file(path)
        assert (e["dtype"], e["loss"], e["heldout_loss"], e["masked"]) == (
            "float32", 1.5 + e["index"], None, False)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta == {"format": "pt", "rtllm_version": storage.rtllm_version(),
                        "sample_index": str(e["index"]), "chain": "0", "step": str(e["step"]),
                        "rtllm_config": json.dumps(RUN_CONFIG, sort_keys=True)}


def test_tied_weights_stored_like_save_pretrained(tmp_path):
    sampled = Sampled()
    write_samples(tmp_path / "out", sampled, n=1)
    sampled.model.save_pretrained(tmp_path / "hf")
    ours = load_file(tmp_path / "out/samples/000000/model.safetensors")
    theirs = load_file(tmp_path / "hf/model.safetensors")
    assert ours.keys() == theirs.keys() and "lm_head.weight" not in ours
    loaded = load(tmp_path / "out/samples/000000")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_from_model_sets_architectures_and_freezes_untrained(tmp_path):
    model = tiny_gpt2()
    model.transformer.wpe.weight.requires_grad_(False)  # a frozen parameter, outside the sampler
    opt = rtllm.RayTracer([p for p in model.parameters() if p.requires_grad], dt=1e-2)
    with SampleWriter.from_model(tmp_path, model, sample_dtype=None, run_config={}) as w:
        assert {s.name for s in w._slots if s.frozen} == {"transformer.wpe.weight"}
        with torch.no_grad():
            expected = model(TOKENS).logits.clone()
        w.submit(index=0, chain=0, step=0, loss=0.0, heldout_loss=0.0)
    assert opt.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = json.loads((tmp_path / "samples/000000/config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "samples/000000")(TOKENS).logits, expected,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("sample_dtype", [None, torch.float32])
def test_bf16_model_in_compute_dtype_or_fp32(tmp_path, sample_dtype):
    sampled = Sampled(torch.bfloat16)
    live = {k: v.detach().clone() for k, v in sampled.named_tensors().items()}
    logits, entries = write_samples(tmp_path, sampled, n=1, sample_dtype=sample_dtype)
    stored = load_file(tmp_path / "samples/000000/model.safetensors")
    want = sample_dtype or torch.bfloat16
    assert entries[0]["dtype"] == str(want).removeprefix("torch.")
    for name, t in stored.items():
        assert t.dtype == want and torch.equal(t, live[name].to(want))  # bf16 -> fp32 is exact
    model = load(tmp_path / "samples/000000")  # dtype "auto": reads config.json
    assert model.dtype == want
    if sample_dtype is None:
        with torch.no_grad():
            torch.testing.assert_close(model(TOKENS).logits, logits[0], rtol=0, atol=0)


def test_rewriting_an_index_is_atomic_and_byte_identical(tmp_path, monkeypatch):
    sampled = Sampled()
    weights = tmp_path / "samples/000001/model.safetensors"
    with writer(tmp_path, sampled) as w:
        w.submit(index=1, chain=0, step=5, loss=1.0, heldout_loss=2.0)
    before = weights.read_bytes()
    entries_before = json.loads((tmp_path / "ensemble.json").read_text())

    replaced, real_replace = [], os.replace

    def spy(src, dst):  # the final path only ever receives a complete, verified file
        if Path(dst) == weights:
            replaced.append(sha256_file(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    with writer(tmp_path, sampled) as w:  # a resumed run re-creating sample 1
        w.submit(index=1, chain=0, step=5, loss=1.0, heldout_loss=2.0)
    assert replaced == [entries_before["samples"][0]["sha256"]]
    assert weights.read_bytes() == before
    assert json.loads((tmp_path / "ensemble.json").read_text()) == entries_before
    assert temp_leftovers(tmp_path) == []

    sampled.step()  # new weights under the same index: replaced and re-listed
    with writer(tmp_path, sampled) as w:
        w.submit(index=1, chain=0, step=6, loss=1.0, heldout_loss=2.0)
    (entry,) = w.close()
    assert entry["sha256"] == sha256_file(weights) != entries_before["samples"][0]["sha256"]


_WRITE_ONE = """
import sys, torch
from rtllm.store.writer import SampleWriter

class StubConfig:  # stands in for a transformers config: the header is what is under test
    dtype = None

    def to_json_string(self):
        return "{}"

def write_one(out, tensors):
    with SampleWriter(out, model_config=StubConfig(), named_tensors=tensors, sample_dtype=None,
                      run_config={"seed": 0}) as w:
        w.submit(index=0, chain=0, step=3, loss=1.0, heldout_loss=None)

if __name__ == "__main__":
    write_one(sys.argv[1], torch.load(sys.argv[2]))
"""


def test_byte_identical_across_processes(tmp_path):
    """The safetensors library orders metadata by a per-process hash seed; our header does not."""
    tensors = {k: v.detach().clone() for k, v in tiny_gpt2().state_dict().items()}
    torch.save(tensors, tmp_path / "w.pt")
    proc = subprocess.run([sys.executable, "-c", _WRITE_ONE, str(tmp_path / "b"),
                           str(tmp_path / "w.pt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    here = {"__name__": "same_code"}
    exec(_WRITE_ONE, here)  # the same code in this process
    here["write_one"](tmp_path / "a", tensors)
    a, b = ((tmp_path / run / "samples/000000/model.safetensors").read_bytes() for run in "ab")
    assert a == b


def _fail_fsync(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_half_written(path, chunks):
    with open(path, "wb") as f:
        f.write(bytes(chunks[0])[: len(chunks[0]) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("how", ["fsync", "half_written"])
def test_full_disk_leaves_only_complete_samples(tmp_path, monkeypatch, how):
    sampled = Sampled()
    w = writer(tmp_path, sampled)
    for i in range(2):
        w.submit(index=i, chain=0, step=i, loss=1.0, heldout_loss=None)
        sampled.step()
    w.flush()
    good = (tmp_path / "ensemble.json").read_bytes()
    if how == "fsync":
        monkeypatch.setattr(os, "fsync", _fail_fsync)
    else:
        monkeypatch.setattr(storage, "_write_synced", _fail_half_written)
    w.submit(index=2, chain=0, step=2, loss=1.0, heldout_loss=None)
    with pytest.raises(SampleWriteError, match="sample 2 .*the disk is full.*resume") as info:
        w.flush()  # the writer thread's error, raised in this thread
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(SampleWriteError):
        w.submit(index=3, chain=0, step=3, loss=1.0, heldout_loss=None)
    with pytest.raises(SampleWriteError):
        w.close()
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["000000", "000001"]
    assert temp_leftovers(tmp_path) == []
    assert (tmp_path / "ensemble.json").read_bytes() == good
    for e in json.loads(good)["samples"]:
        assert e["sha256"] == sha256_file(tmp_path / e["path"] / "model.safetensors")


def test_writer_error_surfaces_in_with_block(tmp_path, monkeypatch):
    sampled = Sampled()
    with pytest.raises(SampleWriteError, match="disk is full"):
        with writer(tmp_path, sampled, run_config={}) as w:
            monkeypatch.setattr(os, "fsync", _fail_fsync)
            w.submit(index=0, chain=0, step=0, loss=1.0, heldout_loss=None)


def test_bounded_pending_buffers(tmp_path):
    sampled = Sampled()
    with writer(tmp_path, sampled, max_pending=1) as w:
        for i in range(4):
            w.submit(index=i, chain=0, step=i, loss=1.0, heldout_loss=None)
            sampled.step()
        assert w._n_buffers == 1
    assert len(w.close()) == 4
    assert w.bytes_per_sample == (tmp_path / "samples/000000/model.safetensors").stat().st_size


def test_index_belongs_to_one_chain(tmp_path):
    sampled = Sampled()
    with writer(tmp_path, sampled) as w:
        w.submit(index=0, chain=0, step=0, loss=1.0, heldout_loss=None)
        with pytest.raises(ValueError, match="unique across chains"):
            w.submit(index=0, chain=1, step=0, loss=1.0, heldout_loss=None)
    with writer(tmp_path, sampled) as w:  # also against the samples of an earlier run
        with pytest.raises(ValueError, match="already belongs to chain 0"):
            w.submit(index=0, chain=2, step=0, loss=1.0, heldout_loss=None)


def test_update_config_reaches_manifest_and_later_samples(tmp_path):
    sampled = Sampled()
    with writer(tmp_path, sampled, run_config={"dt": None}) as w:
        w.submit(index=0, chain=0, step=0, loss=1.0, heldout_loss=None)
        w.update_config({"dt": 0.01})
        assert json.loads((tmp_path / "ensemble.json").read_text())["config"] == {"dt": 0.01}
        w.submit(index=1, chain=0, step=1, loss=1.0, heldout_loss=None)
    metas = []
    for i in range(2):
        with safe_open(str(tmp_path / f"samples/{i:06d}/model.safetensors"), "pt") as f:
            metas.append(json.loads(f.metadata()["rtllm_config"]))
    assert metas == [{"dt": None}, {"dt": 0.01}]
    with pytest.raises(ValueError, match="JSON-serializable"):
        w.update_config({"dtype": torch.float32})
    with writer(tmp_path, sampled, run_config={"dt": 0.02}) as w:  # a resume adopts its config
        pass
    assert Manifest.load(tmp_path).config == {"dt": 0.02} and len(w.close()) == 2


def test_check_free_disk_refuses_with_numbers(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: usage(10**10, 9 * 10**9, 10**9))
    target = tmp_path / "not" / "yet" / "there"
    check_free_disk(target, 10**9 // 2)
    with pytest.raises(ValueError, match=r"needs 5\.00 GB .* only 1\.00 GB is free.*smaller dtype"):
        check_free_disk(target, 5 * 10**9, what="storing 10 samples")
    assert estimate_run_disk(100, 10) == 1100
    assert estimate_run_disk(100, 10, checkpoint_bytes=50, n_checkpoints_kept=2) == 1250
    with pytest.raises(ValueError, match="n_samples"):
        estimate_run_disk(100, -1)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_bytes(path, b"old")
    monkeypatch.setattr(os, "fsync", _fail_fsync)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_copy_tokenizer_copies_what_exists(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    for name in ("tokenizer.json", "merges.txt", "vocab.json", "config.json", "model.safetensors"):
        (src / name).write_text(name)
    assert sorted(copy_tokenizer(src, tmp_path / "out")) == ["merges.txt", "tokenizer.json",
                                                             "vocab.json"]
    assert (tmp_path / "out/merges.txt").read_text() == "merges.txt"
    assert not (tmp_path / "out/config.json").exists()
    with pytest.raises(ValueError, match="does not exist"):
        copy_tokenizer(tmp_path / "missing", tmp_path / "out")


def test_manifest_replaces_by_chain_and_index(tmp_path):
    m = Manifest.open(tmp_path, {"a": 1})
    entry = dict(index=4, chain=1, step=0, path="samples/000004", sha256="x", dtype="float32",
                 loss=None, heldout_loss=None, masked=False)
    m.add(entry)
    m.add({**entry, "step": 9})
    m.add({**entry, "index": 2, "chain": 0})
    m.save()
    assert [(e["chain"], e["index"], e["step"]) for e in Manifest.load(tmp_path).entries] == [
        (0, 2, 0), (1, 4, 9)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sample_dtype", [None, torch.float32])
def test_cuda_snapshot_on_side_stream(tmp_path, sample_dtype):
    """Pinned buffer + side stream: the snapshot holds the weights at submit although updates
    are queued right behind it (wait_snapshot orders only the next update after the copy)."""
    model = tiny_gpt2(torch.bfloat16).cuda()
    opt = rtllm.RayTracer(model.parameters(), dt=1e-2, seed=1)
    tokens = TOKENS.cuda()

    def step():
        opt.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        opt.step()

    expected = []
    with SampleWriter.from_model(tmp_path, model, sample_dtype=sample_dtype, run_config={}) as w:
        for i in range(3):
            step()
            expected.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
            w.submit(index=i, chain=0, step=i, loss=1.0, heldout_loss=None)
            w.wait_snapshot()
            for _ in range(3):
                step()
    for i, want in enumerate(expected):
        stored = load_file(tmp_path / f"samples/{i:06d}/model.safetensors")
        for name, t in stored.items():
            assert torch.equal(t, want[name].to(t.dtype)), name
