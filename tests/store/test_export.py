"""rtllm export --format hf: any ensemble expanded into plain from_pretrained directories."""
import pytest
import torch
from ensemble_fixtures import write_ensemble
from transformers import AutoModelForCausalLM

from rtllm.cli import main
from rtllm.store.ensemble import Ensemble
from rtllm.store.manifest import WEIGHTS, sha256_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("fmt", ["delta8", "safetensors"])
def test_export_expands_every_sample(tiny_model_dir, tmp_path, fmt, capsys):
    src, out = tmp_path / "ens", tmp_path / "hf"
    write_ensemble(tiny_model_dir, src, n=2, sample_format=fmt)
    assert main(["export", "--format", "hf", str(src), str(out)]) == 0
    ens, exported = Ensemble(src), Ensemble(out)
    assert exported.indices == ens.indices and (out / "tokenizer.json").is_file()
    for entry in exported.entries:
        assert "format" not in entry and entry["sha256"] == sha256_file(out / entry["path"] / WEIGHTS)
        model = AutoModelForCausalLM.from_pretrained(out / entry["path"])  # a plain HF directory
        want = ens.state_dict(entry["index"])
        for k, v in model.state_dict().items():
            if k in want:
                assert torch.equal(v, want[k]), k
    assert main(["export", str(src), str(out)]) == 2  # not empty: refused with one line
    assert "not empty" in capsys.readouterr().err
