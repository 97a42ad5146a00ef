"""A sample directory is a whole model: from_pretrained, AutoTokenizer and pipeline work on it
alone (issue 16, item 1)."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, pipeline

from rtllm.store.writer import SampleWriter, copy_tokenizer

PROMPT = "To be, or not"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sample_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble")
    copy_tokenizer(tiny_model_dir, out)  # what a sampling run does at start-up
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    with SampleWriter.from_model(out, model, sample_dtype=None, run_config={"seed": 0}) as w:
        w.submit(index=0, chain=0, step=1, loss=1.0, heldout_loss=None)
    return out / "samples" / "000000"


def test_sample_dir_holds_the_tokenizer_and_generation_config(sample_dir, tiny_model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (sample_dir / name).is_file(), sorted(p.name for p in sample_dir.iterdir())
    assert (sample_dir / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_tokenizer_files_are_hard_linked_where_possible(sample_dir):
    # tmp_path is one filesystem: a link, so an ensemble of many samples stores them once.
    assert os.stat(sample_dir / "tokenizer.json").st_nlink >= 2


def test_auto_tokenizer_on_a_sample_dir_matches_the_model_tokenizer(sample_dir, tiny_model_dir):
    ours, theirs = AutoTokenizer.from_pretrained(sample_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(ours) == len(theirs) > 1
    assert ours(PROMPT)["input_ids"] == theirs(PROMPT)["input_ids"] != []


def test_from_pretrained_on_a_sample_dir_gives_the_submitted_weights(sample_dir, tiny_model_dir):
    got = AutoModelForCausalLM.from_pretrained(sample_dir).state_dict()
    want = GPT2LMHeadModel.from_pretrained(tiny_model_dir).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_text_generation_pipeline_on_a_sample_dir_generates(sample_dir):
    generate = pipeline("text-generation", model=str(sample_dir), device="cpu")
    text = generate(PROMPT, max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith(PROMPT) and len(text) > len(PROMPT), text
