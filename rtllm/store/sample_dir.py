"""What a sample directory holds besides its weights: the files that make it a whole model.

A sample directory must work on its own with `from_pretrained`, `AutoTokenizer` and
`pipeline("text-generation")`, so the tokenizer files of the run's output directory go into
every sample (hard links where the filesystem allows: no extra bytes) and the model's
generation config beside them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from rtllm.store.manifest import _TOKENIZER_FILES, _TOKENIZER_GLOBS

GENERATION_CONFIG = "generation_config.json"


def sample_dir_companions(out_dir: Path) -> list[Path]:
    """The tokenizer files present in `out_dir` (the run's copy of the model's tokenizer)."""
    out = Path(out_dir)
    found = [out / n for n in _TOKENIZER_FILES if (out / n).is_file()]
    return found + sorted(p for g in _TOKENIZER_GLOBS for p in out.glob(g) if p.is_file())


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst`; copy it where links are not possible (other filesystem, FAT).
    Tokenizer files are only ever replaced by rename, never rewritten in place, so a link
    shares the bytes without ever seeing them change."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
