"""The bundled text: Shakespeare plays (in-distribution) and standard-library Python (out of it).

The plays live next to this file (see README.md here); the split is fixed so a model pretrained
on `train_files()` is always evaluated on text it has never seen.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

_TRAIN = ("macbeth.txt", "midsummer_nights_dream.txt", "twelfth_night.txt")
_HELDOUT = ("tempest.txt",)


def corpus_dir() -> Path:
    """Directory holding the bundled plays."""
    return Path(__file__).resolve().parent


def _existing(names: tuple[str, ...]) -> list[Path]:
    paths = [corpus_dir() / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"bundled corpus file(s) missing (broken install?): {missing}")
    return paths


def train_files() -> list[Path]:
    """The plays used for pretraining (and as the in-distribution posterior data)."""
    return _existing(_TRAIN)


def heldout_files() -> list[Path]:
    """The play never trained on, for in-distribution evaluation."""
    return _existing(_HELDOUT)


def python_source_files(max_bytes: int = 300_000) -> list[Path]:
    """Top-level standard-library `.py` files, in name order, at most `max_bytes` in total.

    Files are taken greedily in sorted order, skipping any that would overflow the budget, so
    the choice depends only on the interpreter's version. Out-of-distribution text for a model
    trained on English plays.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for path in sorted(stdlib.glob("*.py"), key=lambda p: p.name):
        size = path.stat().st_size
        if size and total + size <= max_bytes:
            chosen.append(path)
            total += size
    if not chosen:
        raise FileNotFoundError(
            f"no standard-library .py file fits in {max_bytes} bytes under {stdlib} "
            "(interpreter installed without sources, or max_bytes too small)"
        )
    return chosen
