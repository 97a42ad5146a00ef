"""The feature-distance OOD score of `rtllm evaluate` (rtllm/evaluation/feature_distance.py),
its reference text (given, from the manifest, none), the fingerprint, and the plain-language note
when the epistemic AUROC misses the OOD text."""
import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from tiny_gpt2 import corpus_text
from transformers import AutoModelForCausalLM, AutoTokenizer

from rtllm.cli import evaluate as evaluate_cli
from rtllm.evaluation import feature_distance as fd
from rtllm.evaluation import publish
from rtllm.evaluation import job as job_module
from rtllm.evaluation.job import EvalJob, run_job
from rtllm.evaluation.report import tokens_html
from rtllm.evaluation.report_summary import epistemic_note, summary_html
from rtllm.evaluation.streaming import evaluate, make_windows
from rtllm.lm.data import pack, tokenize_texts
from rtllm.store.writer import SampleWriter, copy_tokenizer

SEQ_LEN = 16
PYTHON_SOURCE = "".join(f"def f{i}(x, y={i}):\n    return [x ** {i} for _ in range(y)]  # {i}\n"
                        for i in range(60))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def setup(trained_tiny_model_dir, train_file, tmp_path_factory):
    """Two samples of the trained tiny GPT-2 whose run recorded `train_file` as its training
    text; an unseen stretch of the corpus (ID) and Python source (OOD)."""
    root = tmp_path_factory.mktemp("features")
    model = AutoModelForCausalLM.from_pretrained(trained_tiny_model_dir)
    out = root / "ens"
    gen = torch.Generator().manual_seed(0)
    with SampleWriter(out, model_config=model.config, named_tensors=model.state_dict(), sample_dtype=None,
                      run_config={"seed": 0, "train": [str(train_file)]}) as w:
        for i in range(2):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=gen))
            w.submit(index=i, chain=0, step=10 * i, loss=3.0, heldout_loss=3.0, masked=False)
    copy_tokenizer(trained_tiny_model_dir, out)
    data, ood = root / "data.txt", root / "ood.py"
    data.write_text(corpus_text(2500, offset=60_000))
    ood.write_text(PYTHON_SOURCE)
    return {"ens": out, "data": data, "ood": ood, "train": train_file, "base": trained_tiny_model_dir,
            "root": root}


def test_reference_text_is_near_and_other_text_far(setup):
    model = AutoModelForCausalLM.from_pretrained(setup["base"]).eval()
    tok = AutoTokenizer.from_pretrained(setup["base"])
    ref = fd.reference_windows(tok, [setup["train"]], SEQ_LEN)
    stream, _ = tokenize_texts([(setup["ood"], PYTHON_SOURCE)], tok)
    other = pack(stream, SEQ_LEN)
    feats = fd.window_features(model, torch.cat([ref, other]), torch.device("cpu"))
    assert feats.shape == (len(ref) + len(other), model.config.n_embd) and feats.dtype == torch.float64
    mean, var = fd.fit(feats[:len(ref)])
    own, far = fd.distances(feats[:len(ref)], mean, var), fd.distances(feats[len(ref):], mean, var)
    # The reference scored against its own fit: (n - 1) / n per dimension on average, exactly.
    assert own.mean() == pytest.approx((len(ref) - 1) / len(ref), rel=1e-9)
    # A tiny model (32 features, trained seconds): Python source ~1.9, with an AUROC ~0.82.
    assert far.mean() > 1.5 * own.mean()
    summary = fd.feature_summary(feats[:len(ref)], feats,
                                 np.r_[np.zeros(len(ref), bool), np.ones(len(other), bool)])
    assert summary["auroc_ood_feature"] > 0.75 and summary["n_reference_windows"] == len(ref)
    # Features are the final hidden state after ln_f, averaged over the window's inputs.
    with torch.no_grad():
        hidden = model(ref[:2, :-1], output_hidden_states=True).hidden_states[-1].double().mean(1)
    torch.testing.assert_close(feats[:2], hidden, rtol=1e-5, atol=1e-6)
    capped = fd.reference_windows(tok, [setup["train"]], SEQ_LEN, cap=5)
    assert len(capped) == 5 and torch.equal(capped[0], ref[0]) and torch.equal(capped[-1], ref[-1])


def test_reference_from_manifest_given_none_or_missing(setup, tmp_path):
    choice = fd.resolve_reference(setup["ens"], None)
    assert choice.paths == (str(setup["train"]),) and choice.source == "manifest" and choice.note is None
    assert fd.resolve_reference(setup["ens"], ["none"]) == fd.ReferenceChoice(None, "off")
    assert fd.resolve_reference(setup["ens"], [setup["data"]]).paths == (str(setup["data"]),)
    manifest = json.loads((setup["ens"] / "ensemble.json").read_text())
    for train, why in (([str(tmp_path / "gone.txt")], "gone.txt is not here"), (None, "records no training text")):
        elsewhere = tmp_path / f"ens-{why[:4]}"
        elsewhere.mkdir()
        (elsewhere / "ensemble.json").write_text(json.dumps({**manifest, "config": {"train": train}}))
        choice = fd.resolve_reference(elsewhere, None)
        assert choice.paths is None and choice.source == "missing"
        assert why in choice.note and "--reference" in choice.note
    short = tmp_path / "short.txt"
    short.write_text("To be.")
    tok = AutoTokenizer.from_pretrained(setup["base"])
    with pytest.raises(ValueError, match="fewer than two windows.*--reference none"):
        fd.prepare(setup["ens"], [short], tok, SEQ_LEN)  # named by the user: refused
    (elsewhere / "ensemble.json").write_text(json.dumps({**manifest, "config": {"train": [str(short)]}}))
    choice, windows, note = fd.prepare(elsewhere, "manifest", tok, SEQ_LEN)  # the run's: skipped, said
    assert choice.source == "manifest" and windows is None and "fewer than two windows" in note
    assert fd.prepare(setup["ens"], None, tok, SEQ_LEN)[1:] == (None, None)  # None: no score, no note


def test_evaluate_reports_the_feature_score_and_the_job_fingerprints_its_reference(setup, tmp_path, monkeypatch):
    res = evaluate(setup["ens"], [setup["data"]], ood_texts=[setup["ood"]], seq_len=SEQ_LEN)
    s = res.summary
    assert s["feature_model"] == "sample 0" and s["feature_reference"] == [setup["train"].name]
    assert s["auroc_ood_feature"] > 0.75 and s["mean_feature_distance_ood"] > s["mean_feature_distance"]
    assert 2 <= s["n_reference_windows"] <= fd.MAX_REFERENCE_WINDOWS
    with_base = evaluate(setup["ens"], [setup["data"]], ood_texts=[setup["ood"]], seq_len=SEQ_LEN,
                         baseline=setup["base"], reference=[setup["train"]], max_samples=1)
    assert with_base.summary["feature_model"] == "baseline"
    # The baseline's features come from its NLL pass (a hook): as from a forward of their own.
    tok = AutoTokenizer.from_pretrained(setup["base"])
    windows, is_ood, _ = make_windows(tok, [setup["data"]], [setup["ood"]], SEQ_LEN, 64)
    own = fd.score(AutoModelForCausalLM.from_pretrained(setup["base"]).eval(), windows,
                   fd.reference_windows(tok, [setup["train"]], SEQ_LEN), is_ood, torch.device("cpu"))
    for key in ("mean_feature_distance", "mean_feature_distance_ood", "auroc_ood_feature"):
        assert with_base.summary[key] == pytest.approx(own[key], rel=1e-5), key
    off = evaluate(setup["ens"], [setup["data"]], ood_texts=[setup["ood"]], seq_len=SEQ_LEN, reference=None)
    assert not any("feature" in k for k in off.summary)

    out = tmp_path / "eval"
    job = dict(ensemble=str(setup["ens"]), data=(str(setup["data"]),), ood=(str(setup["ood"]),),
               out=str(out), seq_len=SEQ_LEN)
    first = run_job(EvalJob(**job))
    assert first.summary["feature_reference"] == [setup["train"].name] and first.feature_missing is None
    assert list(first.inputs["reference_texts"]) == [str(setup["train"].resolve())]
    assert "reference text (feature distance)" in (out / "tokens.html").read_text()
    assert run_job(EvalJob(**job, reference=(str(setup["train"]),))).reused  # the manifest's text, named

    def evaluated(*a, **k):
        raise RuntimeError("evaluated again")
    monkeypatch.setattr(job_module, "_evaluate_into", evaluated)
    for other in ((str(setup["data"]),), ("none",)):  # another fingerprint: not reused
        with pytest.raises(RuntimeError, match="evaluated again"):
            run_job(EvalJob(**job, reference=other))
    digests = {publish.fingerprint(setup["ens"], {}, {}, None, {}, reference=r)[0]
               for r in (None, {"a": "x"}, {"a": "y"})}
    assert len(digests) == 3


def test_missing_reference_says_how_to_get_it(setup, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(setup["ens"], bare)
    manifest = json.loads((setup["ens"] / "ensemble.json").read_text())
    (bare / "ensemble.json").write_text(json.dumps({**manifest, "config": {"seed": 0}}))
    args = argparse.Namespace(ensemble=str(bare), data=[str(setup["data"])], ood=[str(setup["ood"])],
                              out=str(tmp_path / "eval"), baseline=None, seq_len=SEQ_LEN, max_samples=None,
                              max_memory=None, mask_heldout_above=None, include_masked=False,
                              allow_degenerate=True, device="cpu", encoding=None, recompute=False,
                              offload=None, offload_host=None, offload_dir=None, reference=None)
    assert evaluate_cli.cmd_evaluate(args) == 0
    captured = capsys.readouterr()
    assert "no feature-distance score" in captured.err and "--reference" in captured.err
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert not any("feature" in k for k in summary)


@pytest.mark.parametrize("epi, total, feature, says", [
    (0.44, 0.85, 0.83, "total entropy (0.85) and feature distance (0.83) separate it better"),
    (0.60, 0.65, None, "neither does total entropy (0.65)"),
    (0.75, 0.95, 0.70, "less well than the other scores; total entropy (0.95) separates it better"),
    (0.90, 0.95, 0.97, None), (0.72, 0.80, 0.86, None), (0.85, None, None, None),
])
def test_epistemic_note_when_the_samples_disagreement_misses_the_ood_text(epi, total, feature, says):
    summary = {"auroc_ood_epistemic": epi}
    if total is not None:
        summary["auroc_ood_total"] = total
    if feature is not None:
        summary["auroc_ood_feature"] = feature
    note = epistemic_note(summary)
    if says is None:
        assert note is None
    else:
        assert says in note and f"AUROC {epi:.2f}" in note and "how often the model read" in note
        assert ("lower on the OOD windows" in note) == (epi < 0.5)  # inverted, said so
    assert epistemic_note({"nll_bma": 3.0}) is None  # no OOD text, no note


def test_report_labels_the_feature_rows_and_shows_the_note(setup):
    res = evaluate(setup["ens"], [setup["data"]], ood_texts=[setup["ood"]], seq_len=SEQ_LEN)
    summary = dict(res.summary, epistemic_note=epistemic_note(
        {"auroc_ood_epistemic": 0.3, "auroc_ood_total": 0.9}))
    rows = summary_html(summary)
    for label in ("OOD detection by feature distance (AUROC)", "feature distance, in-distribution",
                  "features from", "reference text of the features"):
        assert f"<th>{label}</th>" in rows
    page = tokens_html(res.table, summary)
    assert '<p class="warn">the samples&#x27; disagreement (epistemic uncertainty, AUROC 0.30)' in page
    quiet = {k: v for k, v in res.summary.items() if k != "epistemic_note"}
    assert '<p class="warn">' not in tokens_html(res.table, quiet)


def test_cli_help_lists_reference():
    p = argparse.ArgumentParser()
    evaluate_cli.add_evaluate_args(p)
    text = " ".join(p.format_help().split())
    assert "--reference TEXT [TEXT ...]" in text and "'none': no score" in text
    assert all(name in text for name in ("summary.json", "tokens.jsonl", "tokens.html", "evaluation.json"))


def test_offloaded_samples_give_the_same_features(setup, tmp_path):
    """--offload: the first sample dispatched with its blocks on disk (100 kB budget), its
    base model's output taken by a hook; the same numbers as in memory."""
    kw = dict(ood_texts=[setup["ood"]], seq_len=SEQ_LEN, max_samples=1)
    plain = evaluate(setup["ens"], [setup["data"]], **kw).summary
    off = evaluate(setup["ens"], [setup["data"]], offload={"cpu": 100_000}, offload_dir=tmp_path, **kw).summary
    for key in ("mean_feature_distance", "mean_feature_distance_ood", "auroc_ood_feature"):
        assert off[key] == pytest.approx(plain[key], rel=1e-6), key
    assert off["feature_model"] == plain["feature_model"] == "sample 0"


def test_texts_in_another_encoding(setup, tmp_path, monkeypatch):
    """The run's training text is read in the run's encoding (config["encoding"]); one it
    cannot decode skips the score with the reason; --encoding reaches the job's fingerprint."""
    tok = AutoTokenizer.from_pretrained(setup["base"])
    latin = tmp_path / "latin.txt"
    latin.write_bytes(corpus_text(4000).replace("e", "\u00e9").encode("latin-1"))
    manifest = json.loads((setup["ens"] / "ensemble.json").read_text())
    ens = tmp_path / "ens"
    ens.mkdir()
    for encoding, fits in (("latin-1", True), (None, False)):
        (ens / "ensemble.json").write_text(json.dumps({**manifest, "config": {"train": [str(latin)], "encoding": encoding}}))
        choice, windows, note = fd.prepare(ens, "manifest", tok, SEQ_LEN, encoding="utf-8")
        assert (windows is not None) == fits and (note is None) == fits
        assert fits or ("no feature-distance score" in note and "--encoding" in note)

    def evaluated(*a, **k):
        raise RuntimeError("evaluated")
    monkeypatch.setattr(job_module, "_evaluate_into", evaluated)
    with pytest.raises(RuntimeError, match="evaluated"):  # the latin-1 data reached the evaluation
        run_job(EvalJob(ensemble=str(setup["ens"]), data=(str(latin),), out=str(tmp_path / "eval"),
                        encoding="latin-1", reference=(str(latin),)))
