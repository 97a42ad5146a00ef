"""accelerate where it fits: samples dispatched with layers offloaded, OOM back-off in evaluate."""
import pytest
import torch
from ensemble_fixtures import write_ensemble
from tiny_gpt2 import corpus_text
from transformers import GPT2LMHeadModel

import rtllm
from rtllm.evaluation import streaming
from rtllm.evaluation.offload import PieceSize, forward_in_pieces
from rtllm.evaluation.streaming import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")
# The tiny GPT-2 holds ~159 kB of fp32 weights; 100 kB lets the embeddings stay in memory and
# sends the blocks to disk (measured with accelerate.infer_auto_device_map).
SMALL_BUDGET = {"cpu": 100_000}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ensemble_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("offload") / "ens"
    write_ensemble(tiny_model_dir, out, n=2, scale=0.3, sample_format="delta8")
    return out


def test_offloaded_ensemble_matches_the_in_memory_one(ensemble_dir, tmp_path):
    plain = rtllm.EnsembleForCausalLM.from_ensemble(ensemble_dir)
    offloaded = rtllm.EnsembleForCausalLM.from_ensemble(ensemble_dir, max_memory=SMALL_BUDGET,
                                                        offload_dir=tmp_path / "offload")
    placement = offloaded.model.hf_device_map
    assert "disk" in placement.values() and "cpu" in placement.values()  # really split
    assert any((tmp_path / "offload").rglob("*.dat"))  # the offloaded weights are on disk
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    a, b = plain(ids, return_uncertainty=True), offloaded(ids, return_uncertainty=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.epistemic, a.epistemic, rtol=0, atol=1e-6)
    assert torch.equal(offloaded.generate(ids, max_new_tokens=4), plain.generate(ids, max_new_tokens=4))


def test_a_budget_that_needs_the_disk_without_a_directory_is_refused(ensemble_dir):
    with pytest.raises(ValueError, match="offload directory"):
        rtllm.EnsembleForCausalLM.from_ensemble(ensemble_dir, max_memory=SMALL_BUDGET)


def oom_above(limit):
    def forward(x):
        if len(x) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return x * 2
    return forward


def test_forward_in_pieces_backs_off_and_does_not_repeat_pieces():
    inputs, seen, size = torch.arange(37), [], PieceSize(16)
    forward_in_pieces(oom_above(5), inputs, lambda out, w: seen.append((w, out)), size)
    assert size.windows == 4  # 16 -> 8 -> 4, and it stays there
    assert torch.equal(torch.cat([o for _, o in seen]), inputs * 2)
    assert [w for w, _ in seen] == list(range(0, 37, 4))
    with pytest.raises(torch.OutOfMemoryError):  # nothing fits: the error, not a loop
        forward_in_pieces(oom_above(0), inputs, lambda out, w: None, PieceSize(4))
    with pytest.raises(ValueError, match="other"):  # other errors are not swallowed
        forward_in_pieces(lambda x: (_ for _ in ()).throw(ValueError("other")), inputs,
                          lambda out, w: None, PieceSize(4))


def test_evaluate_survives_oom_above_a_size(ensemble_dir, tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text(corpus_text(1500, offset=5000))
    want = evaluate(ensemble_dir, [text], seq_len=16).summary
    forward, calls = GPT2LMHeadModel.forward, []

    def tight(self, input_ids=None, **kw):  # "a device" that fits 3 windows per forward
        calls.append(len(input_ids))
        if len(input_ids) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(GPT2LMHeadModel, "forward", tight)
    monkeypatch.setattr(streaming, "FORWARD_WINDOWS", 16)
    got = evaluate(ensemble_dir, [text], seq_len=16).summary
    assert max(calls) == 16 and calls[-1] <= 3  # tried big, settled small
    assert got["nll_bma"] == pytest.approx(want["nll_bma"], rel=1e-6)
    assert got["mean_epistemic"] == pytest.approx(want["mean_epistemic"], rel=1e-5)


def test_evaluate_with_layers_offloaded_equals_the_in_memory_evaluation(ensemble_dir, tiny_model_dir,
                                                                        tmp_path, monkeypatch):
    from pathlib import Path

    from rtllm.evaluation import offload

    text = tmp_path / "t.txt"
    text.write_text(corpus_text(1200, offset=3000))
    monkeypatch.setattr(streaming, "windows_per_chunk", lambda *a, **k: 40)  # two chunks
    want = evaluate(ensemble_dir, [text], seq_len=16, baseline=tiny_model_dir)
    placed, dispatch = [], offload.dispatch_offloaded

    def spy(model, max_memory, offload_dir=None):  # what accelerate placed where, and on disk
        model = dispatch(model, max_memory, offload_dir)
        placed.append((set(model.hf_device_map.values()), list(Path(offload_dir).rglob("*.dat"))))
        return model

    monkeypatch.setattr(offload, "dispatch_offloaded", spy)
    monkeypatch.setattr(streaming, "dispatch_offloaded", spy)
    got = evaluate(ensemble_dir, [text], seq_len=16, baseline=tiny_model_dir, offload=SMALL_BUDGET,
                   offload_dir=tmp_path / "off")
    assert len(placed) == 4  # the baseline; samples 0, 1, then 0 again (the second chunk runs backwards)
    assert all({"cpu", "disk"} <= where and files for where, files in placed)  # really offloaded
    assert not list((tmp_path / "off").rglob("*.dat"))  # each removed when the next replaced it
    for key in ("nll_bma", "mean_epistemic", "nll_baseline_mean"):
        if key in want.summary:
            assert got.summary[key] == pytest.approx(want.summary[key], abs=1e-5), key
    for key in ("nll_bma", "epistemic", "aleatoric", "nll_baseline"):
        assert abs(got.table[key] - want.table[key]).max() <= 1e-5, key


def test_cli_evaluate_and_generate_offload(ensemble_dir, tmp_path, capsys, monkeypatch):
    import json

    from rtllm.cli import main as cli_main
    from rtllm.evaluation import report
    from rtllm.evaluation.generation import generate_text, terminal_text

    monkeypatch.setattr(report, "write_reports", lambda *a, **k: {})  # the plots: tested elsewhere

    text = tmp_path / "t.txt"
    text.write_text(corpus_text(600, offset=3000))
    base = ["evaluate", "--ensemble", str(ensemble_dir), "--data", str(text), "--seq-len", "16",
            "--allow-degenerate", "--device", "cpu"]
    assert cli_main(base + ["--out", str(tmp_path / "off"), "--offload", "100k"]) == 0
    got = json.loads((tmp_path / "off" / "summary.json").read_text())["nll_bma"]
    assert got == pytest.approx(evaluate(ensemble_dir, [text], seq_len=16).summary["nll_bma"], abs=1e-5)
    capsys.readouterr()
    assert cli_main(base + ["--out", str(tmp_path / "x"), "--offload-dir", str(tmp_path / "d")]) == 2
    assert cli_main(base + ["--out", str(tmp_path / "y"), "--offload", "1G", "--offload-host", "1G"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "go with --offload" in err[0] and "on the CPU" in err[1]
    assert cli_main(["generate", "--ensemble", str(ensemble_dir), "--prompt", "the", "--max-new-tokens", "3",
                     "--device", "cpu", "--color", "never", "--html", str(tmp_path / "g.html"),
                     "--offload", "100k"]) == 0
    plain = generate_text(rtllm.EnsembleForCausalLM.from_ensemble(ensemble_dir, mask="manifest"), "the",
                          max_new_tokens=3)
    assert capsys.readouterr().out == terminal_text(plain, color=False) + "\n"  # same tokens, layers on disk
