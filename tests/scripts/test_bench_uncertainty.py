"""scripts/bench_uncertainty.py (issue 17, part 6): the in-memory scorer and the gaps per target."""
import sys

import numpy as np
import pytest
import torch

from repo_paths import SCRIPTS
from tiny_gpt2 import corpus_text

sys.path.insert(0, str(SCRIPTS))
import bench_uncertainty as B  # noqa: E402


def test_gaps_per_target_and_table_cells():
    pairs = lambda a, b: {"gpl3": {"auroc_epistemic": a, "auroc_total": 0.9},  # noqa: E731
                          "python": {"auroc_epistemic": b, "auroc_total": 0.8}}
    base = {"size": "S", "setting": "own", "ece": 0.01, "gradients": 240, "n_samples": 10}
    start = {**base, "pipeline": "start", "nll_bma": 5.2, "pairs": pairs(0.5, 0.5), "n_samples": 1}
    default = {**base, "pipeline": "default", "nll_bma": 5.1, "pairs": pairs(0.45, 0.9),
               "stationary": True, "trend_z": 0.7}
    deep = {**base, "pipeline": "deepens", "nll_bma": 5.15, "pairs": pairs(0.35, 0.95), "n_samples": 4}
    g = B.gaps(default, start, deep)
    assert g["auroc_min"] == pytest.approx(0.45 - 0.8)
    assert g["nll_vs_start"] == pytest.approx(0.1)
    assert g["auroc_vs_deepens"] == pytest.approx(0.9 - 0.95)  # the worst pair, not the first
    assert g["nll_vs_deepens"] == pytest.approx(0.05)
    lines = B.table([start, default, deep]).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[3].count("|")
    assert "| 0.45 / 0.90 | 0.90 / 0.80 | 5.100 |" in lines[3] and "| -0.35 | +0.100 | -0.05 / +0.050 |" in lines[3]
    assert "n/a | n/a | n/a |" in lines[2]  # the start has no uncertainty of its own


def test_scorer_nll_matches_the_model_and_mi_needs_disagreement(tmp_path, tiny_model_dir):
    from rtllm.lm.data import pack, read_texts, tokenize_texts
    from rtllm.lm.model_io import load_model_and_tokenizer

    paths = {"id": tmp_path / "id.txt", "python": tmp_path / "code.txt"}
    paths["id"].write_text(corpus_text(3000))
    paths["python"].write_text("def f(x):\n    return [x * i for i in range(10)]\n" * 40)
    scorer = B.Scorer(tiny_model_dir, paths)
    model, tok = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32)
    windows = {n: pack(tokenize_texts(read_texts([p]), tok)[0], B.SEQ_LEN) for n, p in paths.items()}
    assert [int((scorer.labels == n).sum()) for n in paths] == [len(w) for w in windows.values()]

    start = {k: v.clone() for k, v in model.state_dict().items()}
    one = scorer.score([start])
    with torch.no_grad():
        w = windows["id"]
        logits = model(input_ids=w[:, :-1]).logits
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    assert one["nll_bma"] == pytest.approx(float(nll), rel=1e-5)
    assert one["mean_epistemic_id"] < 1e-6  # one sample: no disagreement

    gen = torch.Generator().manual_seed(0)
    other = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in start.items()}
    two = scorer.score([start, other], keep_windows=True)
    assert two["mean_epistemic_id"] > 1e-3 and two["pairs"]["python"]["mean_epistemic"] > 1e-3
    assert 0.0 <= two["pairs"]["python"]["auroc_epistemic"] <= 1.0
    labels = np.array(two["windows"]["label"])
    assert np.mean(np.array(two["windows"]["epistemic"])[labels == "id"]) == pytest.approx(two["mean_epistemic_id"])
    # the scorer leaves its model at the start
    assert all(torch.equal(v, start[k]) for k, v in scorer.model.state_dict().items())


def test_feature_column_merged_from_features_jsonl(tmp_path):
    import json

    pairs = {"gpl3": {"auroc_epistemic": 0.4, "auroc_total": 0.9}, "python": {"auroc_epistemic": 0.9, "auroc_total": 0.8}}
    base = {"size": "M", "setting": "own", "ece": 0.01, "gradients": 240, "n_samples": 10, "nll_bma": 5.0, "pairs": pairs}
    rows = [{**base, "pipeline": "start"}, {**base, "pipeline": "default"}, {**base, "pipeline": "sgld"}]
    feature = lambda g, p: {"auroc": {"gpl3": g, "python": p}}  # noqa: E731
    (tmp_path / "features.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"size": "M", "setting": "own", "pipeline": "start", "feature": {"baseline": feature(0.83, 0.88)}},
        {"size": "M", "setting": "own", "pipeline": "default",
         "feature": {"baseline": feature(0.83, 0.88), "first sample": feature(0.86, 0.87)}})) + "\n")
    merged = B.with_features(rows, [tmp_path / "features.jsonl", tmp_path / "absent.jsonl"])
    assert "feature" not in merged[2] and merged[1]["feature"]["first sample"]["auroc"]["gpl3"] == 0.86
    lines = B.table(merged).splitlines()
    assert "feature AUROC gpl3 / python: baseline; first sample |" in lines[0]
    assert len({line.count("|") for line in lines}) == 1
    assert lines[2].endswith("| 0.83 / 0.88 |") and lines[3].endswith("| 0.83 / 0.88; 0.86 / 0.87 |")
    assert lines[4].endswith("| n/a |")
    assert "feature" not in B.table(rows).splitlines()[0]  # no features: the session-4 table
