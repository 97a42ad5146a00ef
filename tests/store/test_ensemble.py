"""Reading an output directory: validation, lazy iteration, loading samples as HF models."""
import json
import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import rtllm
from rtllm.store import ensemble as ensemble_module
from rtllm.store.ensemble import Ensemble, load_sample
from rtllm.store.writer import SampleWriter

TOKENS = torch.arange(12).reshape(2, 6) % 64
MASKED = {1}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Three samples (indices 4, 5, 6; chain 0 for 4 and 6, chain 1 for 5) of a tiny bf16 GPT-2
    sampled with RayTracer, and the logits at each submit."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).to(torch.bfloat16).eval()
    opt = rtllm.RayTracer(model.parameters(), dt=1e-2)
    out = tmp_path_factory.mktemp("ens")
    logits = {}
    with SampleWriter.from_model(out, model, sample_dtype=None, run_config={"seed": 0}) as w:
        for i, chain in zip((4, 5, 6), (0, 1, 0)):
            opt.zero_grad()
            model(TOKENS, labels=TOKENS).loss.backward()
            opt.step()
            with torch.no_grad():
                logits[i] = model(TOKENS).logits.clone()
            w.submit(index=i, chain=chain, step=i, loss=float(i), heldout_loss=i + 0.5,
                     masked=i - 4 in MASKED)
    return out, logits


@pytest.fixture
def copy_of(written, tmp_path):
    shutil.copytree(written[0], tmp_path / "out")
    return tmp_path / "out"


def test_entries_sorted_by_chain_then_index(written):
    ens = Ensemble(written[0])
    assert len(ens) == 3 and ens.indices == [4, 6, 5]
    assert [(e["chain"], e["masked"]) for e in ens.entries] == [(0, False), (0, False), (1, True)]
    assert ens.config == {"seed": 0}
    assert ens.unmasked().indices == [4, 6] and len(ens) == 3


def test_load_model_and_load_sample_reproduce_logits(written):
    out, logits = written
    ens = Ensemble(out)
    for index, expected in logits.items():
        model = ens.load_model(index).eval()
        assert model.dtype == torch.bfloat16
        with torch.no_grad():
            torch.testing.assert_close(model(TOKENS).logits, expected, rtol=0, atol=0)
    model = load_sample(out, 6, dtype=torch.float32)
    assert model.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(TOKENS).logits, logits[6].float(), rtol=0.05,
                                   atol=0.05)  # bf16 rounding of the activations, nothing else


def test_iteration_is_lazy(written, monkeypatch):
    loads = []
    real = ensemble_module.load_file

    def counting(path):
        loads.append(path)
        return real(path)

    monkeypatch.setattr(ensemble_module, "load_file", counting)
    ens = Ensemble(written[0])
    it = iter(ens)
    assert loads == []
    entry, state = next(it)
    assert len(loads) == 1 and entry["index"] == 4
    assert "lm_head.weight" not in state and state["transformer.wte.weight"].dtype == torch.bfloat16
    assert [e["index"] for e, _ in it] == [6, 5] and len(loads) == 3


def test_unknown_index(written):
    with pytest.raises(KeyError, match="no sample with index 0.*not positions"):
        Ensemble(written[0]).load_model(0)


def test_tampered_file_is_named(copy_of):
    weights = copy_of / "samples/000006/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"000006/model\.safetensors has sha256 .*resume the run"):
        Ensemble(copy_of)
    with pytest.raises(ValueError, match="000006"):
        load_sample(copy_of, 6)
    assert len(Ensemble(copy_of, verify=False)) == 3
    load_sample(copy_of, 4)  # the other samples still load, each checked on its own


def test_missing_pieces_are_clear_errors(copy_of, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Ensemble(tmp_path / "nowhere")
    (copy_of / "samples/000005/config.json").unlink()
    with pytest.raises(ValueError, match=r"000005/config\.json is missing .*resume the run"):
        Ensemble(copy_of, verify=False)
    (copy_of / "ensemble.json").unlink()
    with pytest.raises(ValueError, match=r"ensemble\.json is missing"):
        Ensemble(copy_of)


def test_bad_manifest(copy_of):
    path = copy_of / "ensemble.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "schema_version": 2}))
    with pytest.raises(ValueError, match="schema_version 2"):
        Ensemble(copy_of)
    data["samples"][0]["path"] = "../elsewhere"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="outside"):
        Ensemble(copy_of)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        Ensemble(copy_of)
