"""Compressed samples (rtllm.store.delta): codec accuracy vs bf16, the writer, the reader."""
import pytest
import torch
from ensemble_fixtures import write_ensemble

from rtllm.store.delta import DELTA_WEIGHTS, START, DeltaCodec
from rtllm.store.ensemble import Ensemble, load_sample
from rtllm.store.manifest import WEIGHTS, sha256_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def weights_and_offsets(seed=0, n=40_000, weight_scale=0.02, offset_scale=1e-3):
    """GPT-2-like weights (std 0.02) and posterior offsets of scale 1e-3 (5% of a weight)."""
    gen = torch.Generator().manual_seed(seed)
    start = {"w": weight_scale * torch.randn(n, generator=gen),
             "frozen": torch.randn(7, generator=gen), "ids": torch.arange(5)}
    sample = {"w": start["w"] + offset_scale * torch.randn(n, generator=gen),
              "frozen": start["frozen"].clone(), "ids": torch.arange(5) + 1}
    return start, sample


@pytest.mark.parametrize("fmt", ["delta8", "nf4"])
def test_round_trip_error_is_the_recorded_one(fmt):
    start, sample = weights_and_offsets()
    codec = DeltaCodec(fmt)
    stored, errors = codec.encode(sample, start)
    assert "frozen" not in stored and "frozen.q" not in stored  # unchanged: the start's
    back = codec.decode(stored, start)
    assert torch.equal(back["ids"], sample["ids"]) and torch.equal(back["frozen"], sample["frozen"])
    err = back["w"] - sample["w"]
    assert err.abs().max().item() == pytest.approx(errors["max_abs_error"], rel=1e-6)
    n = sum(t.numel() for t in sample.values())
    assert err.square().sum().div(n).sqrt().item() == pytest.approx(errors["rms_error"], rel=1e-5)
    stored_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    assert stored_bytes / n <= codec.bytes_per_weight() + 0.01


def test_delta8_beats_bf16_rounding_at_half_the_bytes():
    """The issue's claim: at offsets of 5% of the weight scale, delta8's max and rms error are
    below bf16's rounding of the same weights. Measured margin on this seed ~3x (rms) and ~7x
    (max); the threshold is 1x, so the test fails only if the codec got much worse."""
    start, sample = weights_and_offsets()
    stored, errors = DeltaCodec("delta8").encode({"w": sample["w"]}, {"w": start["w"]})
    bf16_err = sample["w"].bfloat16().float() - sample["w"]
    assert errors["max_abs_error"] < bf16_err.abs().max().item()
    assert errors["rms_error"] < bf16_err.square().mean().sqrt().item()
    assert sum(t.numel() * t.element_size() for t in stored.values()) <= 0.55 * 2 * sample["w"].numel()


def test_codec_rejects_bad_settings():
    with pytest.raises(ValueError, match="one of delta8, nf4"):
        DeltaCodec("int3")
    with pytest.raises(ValueError, match="power of two"):
        DeltaCodec("delta8", block_size=100)


@pytest.mark.parametrize("fmt", ["delta8", "nf4"])
def test_writer_and_reader(tiny_model_dir, tmp_path, fmt):
    truth = write_ensemble(tiny_model_dir, tmp_path / "ens", n=2, sample_format=fmt)
    ens = Ensemble(tmp_path / "ens")
    assert (tmp_path / "ens" / START / WEIGHTS).is_file()
    for i, entry in enumerate(ens.entries):
        assert entry["format"] == fmt and entry["block_size"] == DeltaCodec(fmt).block_size
        path = tmp_path / "ens" / entry["path"]
        assert not (path / WEIGHTS).exists()
        assert entry["sha256"] == sha256_file(path / DELTA_WEIGHTS)  # the stored bytes
        assert entry["start_sha256"] == sha256_file(tmp_path / "ens" / START / WEIGHTS)
        state = ens.state_dict(entry["index"])
        worst = max((state[k] - truth[i][k]).abs().max().item() for k in state)
        assert worst == pytest.approx(entry["max_abs_error"], rel=1e-6)
        model = load_sample(tmp_path / "ens", entry["index"])
        for k, v in model.state_dict().items():
            if k in state:
                assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="device_map cannot place it"):
        ens.load_model(0, device_map="auto")
    for entry, state in ens:  # iteration expands the samples too
        assert all(torch.equal(v, ens.state_dict(entry["index"])[k]) for k, v in state.items())


def test_a_changed_start_is_refused(tiny_model_dir, tmp_path):
    write_ensemble(tiny_model_dir, tmp_path / "ens", n=1, sample_format="delta8")
    start = tmp_path / "ens" / START / WEIGHTS
    data = bytearray(start.read_bytes())
    data[-1] ^= 1
    start.write_bytes(bytes(data))
    ens = Ensemble(tmp_path / "ens")
    with pytest.raises(ValueError, match="start"):
        ens.state_dict(0)
    assert Ensemble(tmp_path / "ens", verify=False).state_dict(0)  # opt-out still reads


def test_a_resumed_writer_keeps_the_start(tiny_model_dir, tmp_path):
    out = tmp_path / "ens"
    write_ensemble(tiny_model_dir, out, n=1, sample_format="delta8", seed=0)
    before = sha256_file(out / START / WEIGHTS)
    write_ensemble(tiny_model_dir, out, n=2, sample_format="delta8", seed=1)  # same dir again
    assert sha256_file(out / START / WEIGHTS) == before
    assert len(Ensemble(out)) == 2
