"""Expanding an ensemble of any sample format into plain `from_pretrained` directories.

`rtllm export --format hf DIR OUT` writes OUT/samples/NNNNNN/{config.json, model.safetensors}
for every listed sample (compressed ones expanded to their dtype), OUT/ensemble.json listing
them with the hashes of the new files, and the tokenizer: OUT is itself an ensemble directory,
readable by every tool that reads safetensors.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file

from rtllm.store.delta import PLAIN
from rtllm.store.ensemble import Ensemble
from rtllm.store.manifest import (_TOKENIZER_FILES, MANIFEST, SAMPLES, WEIGHTS, Manifest,
                                  atomic_write_bytes, sha256_file)
from rtllm.store.sample_dir import GENERATION_CONFIG, link_or_copy, sample_dir_companions
from rtllm.store.writer import sample_file_hashes

EXPORT_FORMATS = ("hf",)
_DROP = ("format", "file", "block_size", "start", "start_sha256", "max_abs_error", "rms_error", "files")


def export_hf(ensemble_dir: Path | str, out_dir: Path | str, *, overwrite: bool = False,
              progress: Callable[[str], None] | None = None) -> Path:
    """Write every sample of `ensemble_dir` as a from_pretrained directory under `out_dir`."""
    src, out = Ensemble(ensemble_dir, verify=True), Path(out_dir)
    if out.resolve() == src.out_dir.resolve():
        raise ValueError(f"export into {out} would overwrite the ensemble it reads; give another OUT")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} is not empty; give an empty or new directory, or --overwrite")
        shutil.rmtree(out)
    manifest = Manifest(out, src.config, [])
    out.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:  # first: every exported sample directory gets them too
        if (src.out_dir / name).is_file():
            atomic_write_bytes(out / name, (src.out_dir / name).read_bytes())
    for n, entry in enumerate(src.entries, 1):
        rel = f"{SAMPLES}/{entry['index']:06d}"
        target = out / rel
        target.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target / "config.json", (src.path(entry["index"]) / "config.json").read_bytes())
        tmp = target / f".tmp-{WEIGHTS}"
        save_file({k: v.contiguous() for k, v in src.state_dict(entry["index"]).items()}, tmp,
                  metadata={"format": "pt", "sample_index": str(entry["index"])})
        os.replace(tmp, target / WEIGHTS)
        if (src.path(entry["index"]) / GENERATION_CONFIG).is_file():
            atomic_write_bytes(target / GENERATION_CONFIG,
                               (src.path(entry["index"]) / GENERATION_CONFIG).read_bytes())
        for companion in sample_dir_companions(out):  # a sample is a whole model (tokenizer too)
            link_or_copy(companion, target / companion.name)
        plain = {k: v for k, v in entry.items() if k not in _DROP}
        manifest.add({**plain, "path": rel, "sha256": sha256_file(target / WEIGHTS),
                      "files": sample_file_hashes(target)})
        if progress:
            progress(f"sample {entry['index']} ({n}/{len(src)}, {entry.get('format', PLAIN)}) -> {target}")
    manifest.save()
    return out / MANIFEST
