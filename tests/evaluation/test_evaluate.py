"""Streaming ensemble evaluation vs an in-memory float64 reference; masking; bad input; CLI."""
import argparse
import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_gpt2 import corpus_text, make_tiny_gpt2
from transformers import AutoModelForCausalLM, AutoTokenizer

from rtllm.cli import evaluate as evaluate_cli
from rtllm.evaluation import streaming as ev
from rtllm.store.ensemble import Ensemble
from rtllm.evaluation.streaming import TOKEN_TABLE_KEYS, evaluate, write_token_table
from rtllm.evaluation.metrics import auroc, window_means
from rtllm.store.writer import SampleWriter, copy_tokenizer

SEQ_LEN = 16
HELDOUT = {0: 3.0, 1: 3.1, 2: 5.0, 3: 3.2}
MASKED = {3}
# Per token: BMA mean fp32 (4 B) + logits fp32 (4 B) per vocabulary entry + 64 B, over 7/8.
SMALL_MEMORY = 250_000  # ~4 windows of 16 tokens per chunk for the 384-token vocabulary


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """Four samples (chains 0, 0, 1, 1) of the tiny GPT-2, weights perturbed between submits;
    sample 3 marked masked. Texts: in-distribution play text, OOD reversed text."""
    root = tmp_path_factory.mktemp("eval")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = root / "ens"
    gen = torch.Generator().manual_seed(0)
    with SampleWriter(out, model_config=model.config, named_tensors=model.state_dict(),
                      sample_dtype=None, run_config={"seed": 0}) as w:
        for i in range(4):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.3 * p.std().nan_to_num(0.02).clamp_min(0.02)
                           * torch.randn(p.shape, generator=gen))
            w.submit(index=i, chain=i // 2, step=10 * i, loss=3.0, heldout_loss=HELDOUT[i],
                     masked=i in MASKED)
    copy_tokenizer(tiny_model_dir, out)
    data, ood = root / "data.txt", root / "ood.txt"
    data.write_text(corpus_text(1500, offset=5000))
    ood.write_text(corpus_text(600, offset=9000)[::-1])
    return {"ens": out, "data": data, "ood": ood, "base": tiny_model_dir, "root": root}


def reference(setup, indices, weights=None):
    """All samples' logits in memory (each loaded with from_pretrained), metrics in float64."""
    tok = AutoTokenizer.from_pretrained(setup["ens"])
    windows = []
    for path, is_ood in ((setup["data"], False), (setup["ood"], True)):
        ids = torch.tensor(tok(path.read_text(), add_special_tokens=False)["input_ids"])
        n = (len(ids) - 1) // SEQ_LEN
        windows += [(ids[i * SEQ_LEN:(i + 1) * SEQ_LEN + 1], is_ood) for i in range(n)]
    seqs = torch.stack([w for w, _ in windows])
    ens = Ensemble(setup["ens"])
    probs = []
    for i in indices:
        with torch.no_grad():
            logits = ens.load_model(i).eval()(seqs[:, :-1]).logits.double()
        probs.append(torch.softmax(logits, -1).numpy())
    p = np.stack(probs)  # [S, W, T, V]
    w = np.ones(len(indices)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    y = seqs[:, 1:].numpy()
    bma = np.einsum("s,swtv->wtv", w, p)
    take = lambda q: np.take_along_axis(q, y[..., None], -1)[..., 0]  # noqa: E731
    ent = lambda q: -(q * np.log(q)).sum(-1)  # noqa: E731
    alea = np.einsum("s,swt->wt", w, ent(p))
    ref = {"nll_bma": -np.log(take(bma)), "p_observed": take(bma), "entropy_total": ent(bma),
           "aleatoric": alea, "epistemic": ent(bma) - alea,
           "nll_samples_mean": -np.einsum("s,swt->wt", w, np.log(np.stack([take(q) for q in p]))),
           "confidence": bma.max(-1), "correct": bma.argmax(-1) == y,
           "brier": ((bma ** 2).sum(-1) - 2 * take(bma) + 1),
           "token_id": y, "is_ood": np.array([o for _, o in windows])[:, None].repeat(SEQ_LEN, 1)}
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(setup["base"]).eval()(seqs[:, :-1]).logits
    ref["nll_baseline"] = -take(torch.log_softmax(base.double(), -1).numpy())
    return {k: v.reshape(-1) for k, v in ref.items()}


def test_streaming_matches_in_memory_reference(setup):
    assert "lm_head.weight" not in load_file(setup["ens"] / "samples/000000/model.safetensors")
    messages = []
    res = evaluate(setup["ens"], [setup["data"]], ood_texts=[setup["ood"]],
                   baseline=setup["base"], seq_len=SEQ_LEN, max_memory=SMALL_MEMORY,
                   progress=messages.append)
    assert any(m.startswith("chunk 3/") for m in messages)  # several chunks, several samples
    t = res.table
    assert list(t) == list(TOKEN_TABLE_KEYS) and len({len(v) for v in t.values()}) == 1
    ref = reference(setup, [0, 1, 2, 3])
    for key in ("nll_bma", "p_observed", "entropy_total", "aleatoric", "epistemic",
                "nll_samples_mean", "confidence", "nll_baseline"):
        # fp32 forward vs the same fp32 forward: differences are the reductions' rounding
        np.testing.assert_allclose(t[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for key in ("correct", "token_id", "is_ood"):
        np.testing.assert_array_equal(t[key], ref[key], err_msg=key)
    assert t["is_ood"].any() and not t["is_ood"].all()
    assert t["position"].min() == 1 and t["position"].max() == SEQ_LEN
    assert (t["epistemic"] > 0).all()

    s, ind = res.summary, ~ref["is_ood"]
    assert s["n_tokens"] == ind.sum() and s["n_samples_used"] == 4 and s["n_samples_masked"] == 0
    assert s["nll_bma"] == pytest.approx(ref["nll_bma"][ind].mean(), rel=1e-6)
    assert s["perplexity_bma"] == pytest.approx(math.exp(s["nll_bma"]))
    assert s["brier"] == pytest.approx(ref["brier"][ind].mean(), rel=1e-5)
    assert s["nll_baseline"] == pytest.approx(ref["nll_baseline"][ind].mean(), rel=1e-6)
    assert s["accuracy_top1"] == pytest.approx(ref["correct"][ind].mean())
    _, m_in = window_means(ref["epistemic"][ind], t["window"][ind])
    _, m_ood = window_means(ref["epistemic"][~ind], t["window"][~ind])
    assert s["auroc_ood_epistemic"] == pytest.approx(auroc(m_in, m_ood))
    for key in ("ece_top1", "ece_top1_equal_mass", "auroc_ood_total", "mean_epistemic_ood"):
        assert 0 <= s[key] <= 10

    one_chunk = evaluate(setup["ens"], [setup["data"]], ood_texts=[setup["ood"]],
                         seq_len=SEQ_LEN)
    for key in ("nll_bma", "entropy_total", "aleatoric", "epistemic"):
        np.testing.assert_allclose(one_chunk.table[key], t[key], rtol=1e-6, atol=1e-7)
    assert np.isnan(one_chunk.table["nll_baseline"]).all()
    assert "nll_baseline" not in one_chunk.summary


def test_weights_masks_and_max_samples(setup):
    weights = {0: 1.0, 1: 3.0, 2: 0.0, 3: 2.0}
    res = evaluate(setup["ens"], [setup["data"]], ood_texts=[setup["ood"]], seq_len=SEQ_LEN,
                   sample_weights=weights, max_memory=SMALL_MEMORY)
    assert [e["index"] for e in res.samples] == [0, 1, 3]
    assert [e["weight"] for e in res.samples] == pytest.approx([1 / 6, 3 / 6, 2 / 6])
    ref = reference(setup, [0, 1, 3], [1, 3, 2])
    for key in ("nll_bma", "entropy_total", "aleatoric", "nll_samples_mean"):
        np.testing.assert_allclose(res.table[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)

    single = evaluate(setup["ens"], [setup["data"]], seq_len=SEQ_LEN, mask=lambda e: e["index"] != 2)
    assert single.summary["n_samples_used"] == 1 and single.summary["n_samples_masked"] == 3
    assert single.table["epistemic"].max() < 1e-6

    manifest = evaluate(setup["ens"], [setup["data"]], seq_len=SEQ_LEN, mask="manifest")
    assert [e["index"] for e in manifest.samples] == [0, 1, 2]
    heldout = evaluate(setup["ens"], [setup["data"]], seq_len=SEQ_LEN, mask="manifest",
                       mask_heldout_above=4.0, max_samples=1)
    assert heldout.summary["n_samples_masked"] == 2 and heldout.summary["n_samples_used"] == 1
    spaced, _ = ev.select_samples(Ensemble(setup["ens"]).entries, max_samples=3)
    assert [e["index"] for e in spaced] == [0, 2, 3]  # evenly spaced, both ends kept

    with pytest.raises(ValueError, match="all 4 samples are masked"):
        evaluate(setup["ens"], [setup["data"]], mask="manifest", mask_heldout_above=1.0)
    with pytest.raises(ValueError, match="weight 0"):
        evaluate(setup["ens"], [setup["data"]], sample_weights=[0, 0, 0, 0])
    with pytest.raises(ValueError, match="4 samples"):
        evaluate(setup["ens"], [setup["data"]], sample_weights=[1, 1])


def test_default_seq_len_is_context_capped_by_text(setup, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(corpus_text(60))
    res = evaluate(setup["ens"], [short], max_samples=2)
    n_tokens = len(AutoTokenizer.from_pretrained(setup["ens"])(corpus_text(60))["input_ids"])
    assert res.seq_len == n_tokens - 1 and res.summary["n_tokens"] == n_tokens - 1
    assert evaluate(setup["ens"], [setup["data"]], max_samples=1).seq_len == 64  # n_positions


def test_bad_inputs(setup, tmp_path):
    ens, data = setup["ens"], [setup["data"]]
    with pytest.raises(ValueError, match="does not exist"):
        evaluate(tmp_path / "nope", data)
    broken = tmp_path / "broken"
    shutil.copytree(ens, broken)
    weights = broken / "samples/000001/model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        evaluate(broken, data)
    other = make_tiny_gpt2(tmp_path / "other", vocab_size=320)
    with pytest.raises(ValueError, match="vocabulary of"):
        evaluate(ens, data, baseline=other, seq_len=SEQ_LEN)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="0 token"):
        evaluate(ens, [empty])
    short = tmp_path / "short.txt"
    short.write_text("To be, or not")
    with pytest.raises(ValueError, match="fewer than one sequence"):
        evaluate(ens, [short], seq_len=32)
    with pytest.raises(ValueError, match="OOD text"):
        evaluate(ens, data, ood_texts=[short], seq_len=32)
    with pytest.raises(ValueError, match=r"seq_len must be an int in \[1, 64\]"):
        evaluate(ens, data, seq_len=65)
    with pytest.raises(ValueError, match="max_memory .* below one window"):
        evaluate(ens, data, seq_len=SEQ_LEN, max_memory=10_000)
    with pytest.raises(ValueError, match="mask must be"):
        evaluate(ens, data, mask="heldout")


def test_tokenizer_probe_mismatch_is_rejected(setup, tmp_path):
    tok = AutoTokenizer.from_pretrained(setup["ens"])
    swapped = AutoTokenizer.from_pretrained(setup["ens"])
    swapped.backend_tokenizer.normalizer = __import__("tokenizers").normalizers.Lowercase()
    with pytest.raises(ValueError, match="tokenizes"):
        ev.check_same_tokenizer(tok, swapped, setup["ens"], tmp_path)
    ev.check_same_tokenizer(tok, AutoTokenizer.from_pretrained(setup["base"]), setup["ens"],
                            setup["base"])


def test_write_token_table_jsonl_and_csv(tmp_path):
    table = {"window": np.array([0, 0]), "position": np.array([1, 2]),
             "token_id": np.array([5, 7]), "token": np.array([" the", 'a,"\n'], dtype=object),
             **{k: np.array([0.5, 1.25]) for k in ("nll_bma", "p_observed", "entropy_total",
                                                   "aleatoric", "epistemic", "nll_samples_mean",
                                                   "confidence")},
             "correct": np.array([True, False]), "nll_baseline": np.array([np.nan, 2.0]),
             "is_ood": np.array([False, True])}
    write_token_table(table, tmp_path / "t.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert list(rows[0]) == list(TOKEN_TABLE_KEYS) and rows[0]["nll_baseline"] is None
    assert rows[1]["token"] == 'a,"\n' and rows[1]["correct"] is False and rows[1]["nll_bma"] == 1.25
    write_token_table(table, tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert got[1]["token"] == 'a,"\n' and got[0]["nll_baseline"] == "" and got[0]["correct"] == "true"
    with pytest.raises(ValueError, match=".jsonl or .csv"):
        write_token_table(table, tmp_path / "t.txt")


def test_cli_writes_summary_and_tokens(setup, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    evaluate_cli.add_evaluate_args(parser)
    out = tmp_path / "eval"
    args = parser.parse_args(["--ensemble", str(setup["ens"]), "--data", str(setup["data"]),
                              "--ood", str(setup["ood"]), "--seq-len", str(SEQ_LEN),
                              "--max-memory", "1M", "--mask-heldout-above", "4.0",
                              "--device", "cpu", "--out", str(out)])
    assert args.max_memory == 1 << 20
    assert evaluate_cli.cmd_evaluate(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_samples_used"] == 2 and summary["n_samples_masked"] == 2  # 2: heldout, 3: flag
    lines = (out / "tokens.jsonl").read_text().splitlines()
    assert len(lines) == summary["n_tokens"] + summary["n_tokens_ood"]
    assert "nll_bma" in capsys.readouterr().out
