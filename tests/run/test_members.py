"""Deep-ensemble members (MILE stage 1): early stopping, reuse, reproducibility, bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file

from rtllm.lm.data import TokenData, read_texts
from rtllm.run.members import MEMBER_INFO, MemberTraining, is_member_complete, member_seed, train_member
from rtllm.lm.model_io import load_tokenizer
from tiny_gpt2 import corpus_text

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tiny_model_dir, tmp_path_factory):
    text = tmp_path_factory.mktemp("text") / "train.txt"
    text.write_text(corpus_text(12_000))
    tok = load_tokenizer(tiny_model_dir, "save_pretrained")
    return TokenData.from_texts(tok, read_texts([text]), seq_len=32)


def _weights(d):
    return load_file(str(d / "model.safetensors"))


def test_member_improves_heldout_and_saves_its_best(tiny_model_dir, data, tmp_path):
    settings = MemberTraining(lr=3e-3, max_steps=30, eval_every=5, patience=2, batch_size=4)
    info = train_member(tiny_model_dir, data, tmp_path / "m0", member=0, seed=0, settings=settings,
                        device=CPU, log=lambda _m: None)
    assert is_member_complete(tmp_path / "m0")
    assert info["best_heldout_nll"] < info["start_heldout_nll"]  # a random-init model learns fast
    best = min(h["heldout_nll"] for h in info["history"])
    assert info["best_heldout_nll"] == best
    assert json.loads((tmp_path / "m0" / MEMBER_INFO).read_text())["best_step"] == info["best_step"]
    # Early stopping: the run ends `patience` evaluations after the best one, or at max_steps.
    evals_after_best = [h for h in info["history"] if h["step"] > info["best_step"]]
    assert len(evals_after_best) <= settings.patience


def test_members_differ_and_reproduce_from_their_seed(tiny_model_dir, data, tmp_path):
    settings = MemberTraining(lr=3e-3, max_steps=10, eval_every=5, patience=5, batch_size=4)
    kw = dict(seed=7, settings=settings, device=CPU, log=lambda _m: None)
    train_member(tiny_model_dir, data, tmp_path / "a", member=0, **kw)
    train_member(tiny_model_dir, data, tmp_path / "b", member=1, **kw)
    train_member(tiny_model_dir, data, tmp_path / "a2", member=0, **kw)
    a, b, a2 = (_weights(tmp_path / n) for n in ("a", "b", "a2"))
    assert all(torch.equal(a[k], a2[k]) for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert member_seed(7, 0) != member_seed(7, 1)


def test_complete_member_is_reused_not_retrained(tiny_model_dir, data, tmp_path):
    settings = MemberTraining(lr=3e-3, max_steps=5, eval_every=5, batch_size=4)
    train_member(tiny_model_dir, data, tmp_path / "m", member=0, seed=0, settings=settings, device=CPU,
                 log=lambda _m: None)
    stamp = (tmp_path / "m" / "model.safetensors").stat().st_mtime_ns
    said = []
    train_member(tiny_model_dir, data, tmp_path / "m", member=0, seed=0, settings=settings, device=CPU,
                 log=said.append)
    assert (tmp_path / "m" / "model.safetensors").stat().st_mtime_ns == stamp
    assert "reusing" in said[0]


def test_from_scratch_member_starts_from_a_fresh_init(tiny_model_dir, data, tmp_path):
    settings = MemberTraining(lr=3e-3, max_steps=5, eval_every=5, batch_size=4, from_scratch=True)
    info0 = train_member(tiny_model_dir, data, tmp_path / "s0", member=0, seed=0, settings=settings,
                         device=CPU, log=lambda _m: None)
    info1 = train_member(tiny_model_dir, data, tmp_path / "s1", member=1, seed=0, settings=settings,
                         device=CPU, log=lambda _m: None)
    assert info0["start_heldout_nll"] != info1["start_heldout_nll"]  # different random inits


@pytest.mark.parametrize("bad", [dict(lr=0.0), dict(max_steps=0), dict(patience=0), dict(lr=float("nan")),
                                 dict(batch_size=True)])
def test_bad_member_settings(bad):
    with pytest.raises(ValueError, match="member training"):
        MemberTraining(**bad)
