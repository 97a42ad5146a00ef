"""A random tiny GPT-2 + byte-level BPE tokenizer saved as a Hugging Face directory, in ~1 s.

For tests that need something `from_pretrained` can load, without the minute `pretrain` takes.
Register the session fixtures in conftest.py with
`from tiny_gpt2 import tiny_model_dir, train_file  # noqa: F401`.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rtllm.lm.corpus import train_files
from rtllm.lm.pretrain import train_bpe_tokenizer

TOKENIZER_TEXT_BYTES = 8_000  # enough for a few hundred merges, still trains in milliseconds


def make_tiny_gpt2(
    dir: str | Path,
    *,
    vocab_size: int = 384,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    n_positions: int = 64,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised GPT2LMHeadModel and its tokenizer into `dir`; return `dir`.

    The tokenizer is trained on the first few KB of the bundled corpus, so Shakespeare-like
    text tokenizes into short, realistic ids. Same seed, same weights.
    """
    dir = Path(dir)
    text = train_files()[0].read_text(encoding="utf-8")[:TOKENIZER_TEXT_BYTES]
    tokenizer = train_bpe_tokenizer([text], vocab_size, max_length=n_positions)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    return dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny GPT-2 directory shared by the whole session; treat it as read-only."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


def corpus_text(n_bytes: int, offset: int = 0) -> str:
    """A slice of the bundled training text (real English, so a tiny model can learn something)."""
    return train_files()[0].read_text(encoding="utf-8")[offset : offset + n_bytes]


def save_trained_tiny_model(dir: str | Path, *, steps: int = 150, seq_len: int = 32, seed: int = 0) -> Path:
    """make_tiny_gpt2, then a few seconds of AdamW on the bundled text: a *trained* start, as
    sampling expects (from a random start the chain just descends)."""
    dir = make_tiny_gpt2(dir, seed=seed)
    model = GPT2LMHeadModel.from_pretrained(dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dir)
    ids = torch.tensor(tokenizer(corpus_text(30_000))["input_ids"])
    seqs = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = seqs[torch.randint(len(seqs), (16,), generator=gen)]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(dir)
    return dir


@pytest.fixture(scope="session")
def trained_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One trained tiny GPT-2 (save_trained_tiny_model) shared by the whole session: the
    training runs once however many test modules sample from it. Treat it as read-only."""
    return save_trained_tiny_model(tmp_path_factory.mktemp("trained_tiny_gpt2"))


@pytest.fixture(scope="session")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 kB of the bundled corpus as a training text file (read-only for the tests)."""
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(corpus_text(12_000, offset=30_000))
    return path
