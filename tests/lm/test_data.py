"""Reading, tokenizing and packing text; the held-out split; the resumable minibatch order."""
from __future__ import annotations

import math

import pytest
import torch

from rtllm.lm.data import (MinibatchOrder, TokenData, context_length, inputs_and_targets, pack,
                        read_texts, split_heldout, tokenize_texts)
from test_model_io import EOS, build_tokenizer, tiny_config, tiny_text


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "b.txt").write_text(tiny_text(40, seed=1))
    (tmp_path / "a.txt").write_text(tiny_text(40, seed=2))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes").write_text(tiny_text(20, seed=3))  # no extension: still text
    (tmp_path / "sub" / "blob.bin").write_bytes(b"\x00\x01\x02")   # binary: skipped
    (tmp_path / ".hidden").write_text("skipped")
    return tmp_path


# -- reading ----------------------------------------------------------------------------------

def test_read_texts_recursive_sorted(corpus):
    texts = read_texts([corpus])
    assert [p.relative_to(corpus).as_posix() for p, _ in texts] == ["a.txt", "b.txt", "sub/notes"]
    assert texts[0][1] == tiny_text(40, seed=2)


def test_read_texts_dedups_and_keeps_argument_order(corpus):
    texts = read_texts([corpus / "b.txt", corpus])
    assert [p.name for p, _ in texts] == ["b.txt", "a.txt", "notes"]


def test_read_texts_refuses_bad_utf8_unless_an_encoding_is_given(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"caf\xe9 ok")
    with pytest.raises(ValueError, match=r"not valid utf-8 \(byte 0xe9 at offset 3\).*--encoding"):
        read_texts([tmp_path / "x.txt"])
    assert read_texts([tmp_path / "x.txt"], encoding="latin-1")[0][1] == "caf\u00e9 ok"
    with pytest.raises(ValueError, match="not an encoding"):
        read_texts([tmp_path / "x.txt"], encoding="klingon-8")


def test_read_texts_refuses_a_named_binary_file(tmp_path):
    (tmp_path / "prog").write_bytes(b"\x7fELF\x02\x01\x01\x00" + b"text" * 100)
    with pytest.raises(ValueError, match="binary file"):
        read_texts([tmp_path / "prog"])


def test_read_texts_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_texts([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text files"):
        read_texts([tmp_path / "empty"])


# -- tokenizing and packing -------------------------------------------------------------------

def test_tokenize_joins_documents_with_eos(tok, corpus):
    texts = read_texts([corpus / "a.txt", corpus / "b.txt"])
    stream, counts = tokenize_texts(texts, tok)
    eos = tok.convert_tokens_to_ids(EOS)
    assert stream.dtype == torch.long and len(stream) == sum(counts) + 1
    assert stream[counts[0]] == eos and (stream == eos).sum() == 1
    assert tok.decode(stream[:counts[0]]) == texts[0][1]


@pytest.mark.parametrize("n_tokens,seq_len", [(2, 1), (18, 17), (100, 7), (1025, 32)])
def test_pack_shapes_and_overlap(n_tokens, seq_len):
    stream = torch.arange(n_tokens)
    seqs = pack(stream, seq_len)
    n = (n_tokens - 1) // seq_len
    assert seqs.shape == (n, seq_len + 1)
    inputs, targets = inputs_and_targets(seqs)
    assert inputs.shape == targets.shape == (n, seq_len)
    # Every transition stream[i] -> stream[i+1] is scored once, in order.
    assert torch.equal(inputs.reshape(-1), stream[: n * seq_len])
    assert torch.equal(targets.reshape(-1), stream[1: n * seq_len + 1])


def test_pack_too_short_names_the_text():
    with pytest.raises(ValueError, match=r"x\.txt: 9 tokens.* has 9 tokens, fewer than one sequence"):
        pack(torch.arange(9), 8 + 1, what="the text (x.txt: 9 tokens)")


def test_context_length():
    assert context_length(tiny_config("gpt2", n_positions=48)) == 48
    assert context_length(tiny_config("llama", n_positions=40)) == 40


# -- held-out split ---------------------------------------------------------------------------

def test_split_heldout_default_tail():
    stream = torch.arange(1000)
    train, held = split_heldout(stream)
    assert len(held) == 50 and torch.equal(torch.cat([train, held]), stream)


def test_split_heldout_from_files():
    stream, other = torch.arange(10), torch.arange(5)
    train, held = split_heldout(stream, other)
    assert train is stream and held is other
    with pytest.raises(ValueError, match="fraction"):
        split_heldout(stream, fraction=1.0)


def test_heldout_tail_excludes_training_tokens(tok, corpus):
    data = TokenData.from_texts(tok, read_texts([corpus]), context=32)
    stream, _ = tokenize_texts(read_texts([corpus]), tok)
    cut = len(stream) - math.ceil(0.05 * len(stream))
    assert data.seq_len == data.heldout_seq_len == 32
    assert data.train.dtype == data.heldout.dtype == torch.long
    # Training sequences read only stream[:cut]; held-out ones only stream[cut:].
    n = len(data.train)
    assert torch.equal(data.train.reshape(-1)[:33], stream[:33])
    assert n * 32 + 1 <= cut < (n + 1) * 32 + 1
    assert torch.equal(data.heldout[0], stream[cut: cut + 33])
    assert len(data.heldout) * 32 + 1 <= len(stream) - cut


def test_heldout_files(tok, corpus):
    data = TokenData.from_texts(tok, read_texts([corpus / "a.txt"]), seq_len=16, context=32,
                                heldout=read_texts([corpus / "b.txt"]))
    a, _ = tokenize_texts(read_texts([corpus / "a.txt"]), tok)
    b, _ = tokenize_texts(read_texts([corpus / "b.txt"]), tok)
    assert data.train.shape == ((len(a) - 1) // 16, 17)  # the whole text trains
    assert data.heldout.shape == ((len(b) - 1) // 16, 17)
    assert torch.equal(data.heldout[0], b[:17])


def test_default_seq_len_is_capped_by_text(tok, tmp_path):
    (tmp_path / "short.txt").write_text(tiny_text(3))
    data = TokenData.from_texts(tok, read_texts([tmp_path]), context=1024)
    assert len(data.train) == 1 and data.seq_len < 1024 and len(data.heldout) == 1


def test_too_short_text_names_files_and_counts(tok, tmp_path):
    (tmp_path / "short.txt").write_text(tiny_text(2))
    texts = read_texts([tmp_path])
    with pytest.raises(ValueError, match=r"short\.txt: \d+ tokens; \d+ tokens after holding out"
                                         r".*fewer than one sequence of seq_len \+ 1 = 513"):
        TokenData.from_texts(tok, texts, seq_len=512)
    with pytest.raises(ValueError, match=r"seq_len must be in \[1, 32\]"):
        TokenData.from_texts(tok, texts, context=32, seq_len=64)
    with pytest.raises(ValueError, match="give seq_len or the model's context length"):
        TokenData.from_texts(tok, texts)


# -- minibatch order --------------------------------------------------------------------------

def test_order_is_a_permutation_per_epoch():
    order = MinibatchOrder(10, 3, seed=7)
    assert order.batches_per_epoch == 3
    for epoch in range(3):
        seen = torch.cat([order.batch(epoch * 3 + k) for k in range(3)])
        assert len(seen.unique()) == 9 and seen.dtype == torch.long
    assert not torch.equal(order.permutation(0), order.permutation(1))


def test_order_determinism_and_resume():
    full = [MinibatchOrder(23, 4, seed=3).batch(c) for c in range(40)]
    again = MinibatchOrder(23, 4, seed=3)
    assert all(torch.equal(again.batch(c), b) for c, b in enumerate(full))
    resumed = MinibatchOrder(23, 4, seed=3)  # a fresh process restoring cursor 17
    assert all(torch.equal(resumed.batch(c), full[c]) for c in range(17, 40))
    # Pure function of the cursor: going back does not disturb anything.
    assert torch.equal(resumed.batch(2), full[2]) and torch.equal(resumed.batch(39), full[39])
    other = MinibatchOrder(23, 4, seed=4)
    assert not all(torch.equal(other.batch(c), full[c]) for c in range(5))


def test_order_bad_arguments():
    with pytest.raises(ValueError, match="batch_size 5 exceeds the 4 sequences"):
        MinibatchOrder(4, 5, seed=0)
    with pytest.raises(ValueError, match="seed must be"):
        MinibatchOrder(4, 2, seed=-1)
    with pytest.raises(ValueError, match="cursor must be"):
        MinibatchOrder(4, 2, seed=0).batch(-1)
