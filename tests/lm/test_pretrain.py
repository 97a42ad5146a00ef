"""The bundled corpus and the built-in pretraining, at toy sizes (a few seconds in all)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rtllm.lm.corpus import corpus_dir, heldout_files, python_source_files, train_files
from rtllm.lm.pretrain import EOS, INFO_FILE, ensure_pretrained, is_complete, pretrain

# Toy sizes: each run trains for well under a second once the libraries are imported.
SMALL = dict(
    steps=12, vocab_size=320, seq_len=32, n_layer=1, n_embd=32, n_head=2, batch_size=8, lr=1e-2,
    log=None,
)


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two short excerpts of the training plays: the multi-file path at a tenth of the cost."""
    root = tmp_path_factory.mktemp("texts")
    out = []
    for path in train_files()[:2]:
        excerpt = root / path.name
        excerpt.write_text(path.read_text(encoding="utf-8")[:12_000], encoding="utf-8")
        out.append(excerpt)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, texts: list[Path]) -> Path:
    return pretrain(tmp_path_factory.mktemp("runs") / "model", texts, **SMALL)


def test_corpus_files_exist_and_split():
    train, held = train_files(), heldout_files()
    names = ["macbeth.txt", "midsummer_nights_dream.txt", "twelfth_night.txt"]
    assert [p.name for p in train] == names
    assert [p.name for p in held] == ["tempest.txt"]
    for path in train + held:
        assert path.parent == corpus_dir() and path.stat().st_size > 50_000
    assert (corpus_dir() / "README.md").is_file()


def test_python_source_files_deterministic_and_bounded():
    files = python_source_files(100_000)
    assert files and files == python_source_files(100_000)
    assert [p.name for p in files] == sorted(p.name for p in files)
    assert all(p.suffix == ".py" and p.is_file() for p in files)
    assert sum(p.stat().st_size for p in files) <= 100_000
    with pytest.raises(ValueError, match="max_bytes"):
        python_source_files(0)


def test_output_loads_offline(trained: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert is_complete(trained)
    model = AutoModelForCausalLM.from_pretrained(trained)
    tok = AutoTokenizer.from_pretrained(trained)
    assert model.config.model_type == "gpt2" and model.config.n_positions == SMALL["seq_len"]
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as GPT-2
    assert model.config.vocab_size == len(tok) <= SMALL["vocab_size"]
    assert tok.eos_token == tok.bos_token == EOS and model.config.eos_token_id == tok.eos_token_id
    # Held-out text (never seen by the tokenizer) survives encode/decode byte for byte.
    text = heldout_files()[0].read_text(encoding="utf-8")[:2_000] + "  odd  spacing , ü\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_loss_decreases_and_is_reported(trained: Path):
    info = json.loads((trained / INFO_FILE).read_text())
    assert info["val_loss"] < info["initial_val_loss"] - 0.5
    assert info["train_loss"] < info["initial_val_loss"] - 0.5


def test_log_reports_final_losses(tmp_path: Path, texts: list[Path]):
    lines: list[str] = []
    pretrain(tmp_path / "m", texts, **{**SMALL, "steps": 2, "log": lines.append})
    assert "train" in lines[-1] and "validation" in lines[-1] and "nats/token" in lines[-1]


def test_pretraining_prints_no_transformers_warning(tmp_path: Path, texts: list[Path], transformers_warnings):
    # transformers >= 5 warned "loss_type=None ... unrecognized" on GPT-2's first loss: noise on a
    # newcomer's first screen.
    pretrain(tmp_path / "m", texts, **{**SMALL, "steps": 2, "log": lambda line: None})
    assert not transformers_warnings


def test_same_seed_same_weights(trained: Path, tmp_path: Path, texts: list[Path]):
    again = pretrain(tmp_path / "again", texts, **SMALL)
    a, b = load_file(trained / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)
    assert (trained / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    other_dir = pretrain(tmp_path / "other", texts, **{**SMALL, "seed": 1})
    other = load_file(other_dir / "model.safetensors")
    assert not all(a[k].equal(other[k]) for k in a)


def test_refuses_non_empty_out_dir_unless_overwrite(tmp_path: Path, texts: list[Path]):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("not a model")
    with pytest.raises(ValueError, match="not empty"):
        pretrain(out, texts, **SMALL)
    assert (out / "keep.txt").exists()
    pretrain(out, texts, overwrite=True, **{**SMALL, "steps": 2})
    assert is_complete(out) and not (out / "keep.txt").exists()
    # Nothing half-written is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_empty_out_dir_is_fine(tmp_path: Path, texts: list[Path]):
    (tmp_path / "m").mkdir()
    assert is_complete(pretrain(tmp_path / "m", texts, **{**SMALL, "steps": 2}))


def test_ensure_pretrained_creates_then_reuses(tmp_path: Path, texts: list[Path]):
    out = ensure_pretrained(tmp_path / "cache", texts=texts, **{**SMALL, "steps": 2})
    assert is_complete(out)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    assert ensure_pretrained(out, texts=texts, **{**SMALL, "log": lines.append}) == out
    assert lines == [] and (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_ensure_pretrained_rejects_foreign_directory(tmp_path: Path):
    (tmp_path / "junk.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="lacks"):
        ensure_pretrained(tmp_path)


def test_bad_texts(tmp_path: Path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match="nope.txt"):
        pretrain(tmp_path / "m", [missing], **SMALL)
    short = tmp_path / "short.txt"
    short.write_text("Fair is foul, and foul is fair.\n")
    with pytest.raises(ValueError, match=r"short\.txt.*too short"):
        pretrain(tmp_path / "m", [short], **SMALL)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        pretrain(tmp_path / "m", [empty], **SMALL)
    assert not (tmp_path / "m").exists()
