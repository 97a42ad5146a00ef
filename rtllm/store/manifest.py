"""The ensemble directory on disk: durable writes, the manifest (ensemble.json), disk checks.

Every write goes to a temporary sibling, is fsynced, then renamed into place; the directory is
fsynced too, so a crash leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
MANIFEST = "ensemble.json"
RUN_MARKER = "run.json"  # marks a directory as an rtllm output (so --overwrite may clear it)
SAMPLES = "samples"
WEIGHTS = "model.safetensors"
_TMP_PREFIX = ".tmp-"
_CHUNK = 64 << 20  # write/hash granularity: bounded extra memory, few syscalls
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model", "chat_template.json",
                    "chat_template.jinja")
_TOKENIZER_GLOBS = ("*.tiktoken",)
# safetensors dtype codes (the format's spec); other dtypes cannot be stored.
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def rtllm_version() -> str:
    try:
        return importlib.metadata.version("rtllm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- disk space ---------------------------------------------------------------------------------
def estimate_run_disk(bytes_per_sample: int, n_samples: int, checkpoint_bytes: int = 0,
                      n_checkpoints_kept: int = 1) -> int:
    """Peak bytes a run needs: the samples plus one sample being written, and the checkpoints
    kept plus the one being written before the oldest is removed."""
    for name, value in (("bytes_per_sample", bytes_per_sample), ("n_samples", n_samples),
                        ("checkpoint_bytes", checkpoint_bytes),
                        ("n_checkpoints_kept", n_checkpoints_kept)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    checkpoints = checkpoint_bytes * (n_checkpoints_kept + 1) if checkpoint_bytes else 0
    return bytes_per_sample * (n_samples + 1) + checkpoints


def check_free_disk(out_dir: Path, needed_bytes: int, what: str = "the run") -> None:
    """Raise ValueError when the filesystem holding `out_dir` has less than `needed_bytes` free."""
    probe = Path(out_dir).absolute()
    while not probe.exists() and probe != probe.parent:  # out_dir may not exist yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        need_text, free_text = distinct_gb(needed_bytes, free)
        raise ValueError(
            f"{what} needs {need_text} GB under {out_dir} but only "
            f"{free_text} GB is free there; free some space, write to another directory, "
            f"keep fewer samples, or store them in a smaller dtype")


def distinct_gb(a: int, b: int) -> tuple[str, str]:
    """Both byte counts in GB with the fewest decimals (at least 2) that tell them apart."""
    for decimals in range(2, 10):
        x, y = f"{a / 1e9:.{decimals}f}", f"{b / 1e9:.{decimals}f}"
        if x != y:
            break
    return x, y


# -- atomic files -------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    """Make a rename durable. Some platforms cannot open directories; nothing to do there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the complete new one."""
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    # allow_nan=False: NaN/Infinity are not JSON and other tools reject them.
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def copy_tokenizer(src_model_dir: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files that exist in `src_model_dir` to `out_dir`; returns their names."""
    src, out = Path(src_model_dir), Path(out_dir)
    if not src.is_dir():
        raise ValueError(f"model directory {src} does not exist; pass a local model directory")
    names = [n for n in _TOKENIZER_FILES if (src / n).is_file()]
    names += sorted(p.name for g in _TOKENIZER_GLOBS for p in src.glob(g) if p.is_file())
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        atomic_write_bytes(out / name, (src / name).read_bytes())
    return names


# -- manifest -----------------------------------------------------------------------------------
def _json_normal(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serializable (str/int/float/bool/None, lists, "
                         f"dicts with str keys, finite floats): {e}") from None


class Manifest:
    """ensemble.json: the run config and the complete samples, one entry per (chain, index)."""

    def __init__(self, out_dir: Path, config: dict, samples: list[dict]) -> None:
        self.out_dir = Path(out_dir)
        self.config = config
        self._samples = {(s["chain"], s["index"]): s for s in samples}

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST

    @classmethod
    def load(cls, out_dir: Path) -> "Manifest":
        """Read an existing manifest; ValueError saying what is wrong and what to do."""
        out_dir = Path(out_dir)
        path = out_dir / MANIFEST
        if not out_dir.is_dir():
            raise ValueError(f"output directory {out_dir} does not exist; pass the directory a "
                             f"sampling run wrote")
        if not path.is_file():
            raise ValueError(f"{path} is missing, so {out_dir} holds no listed samples; pass the "
                             f"directory a sampling run wrote, or resume the run to re-create it")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} cannot be read as JSON ({e}); restore it or resume the run "
                             f"to rewrite it") from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise ValueError(f"{path} has schema_version {version!r}; this rtllm reads version "
                             f"{SCHEMA_VERSION}: use the rtllm version that wrote it")
        samples = data.get("samples")
        needed = {"index", "chain", "step", "path", "sha256", "dtype", "loss", "heldout_loss",
                  "masked"}
        if not isinstance(samples, list) or not all(
                isinstance(s, dict) and needed <= s.keys() for s in samples):
            raise ValueError(f"{path} has a malformed 'samples' list (each entry needs "
                             f"{sorted(needed)}); restore the file or resume the run")
        for s in samples:
            for key in ("index", "chain", "step"):
                if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 0:
                    raise ValueError(f"{path}: a sample's {key!r} is {s[key]!r}, not an integer "
                                     f">= 0; restore the file or resume the run")
            if not isinstance(s["path"], str) or not isinstance(s["sha256"], str) or \
                    not isinstance(s.get("files", {}), dict):
                raise ValueError(f"{path}: sample {s['index']} has a malformed path, sha256 or "
                                 f"files entry; restore the file or resume the run")
        return cls(out_dir, data.get("config", {}), samples)

    @classmethod
    def open(cls, out_dir: Path, config: dict) -> "Manifest":
        """Load the manifest of `out_dir` if there is one, else start an empty one (written on
        the first save); either way `config` becomes its run config. Whether a resumed run may
        continue the listed samples is the caller's decision (it knows the chain-defining
        fields), not the manifest's."""
        config = _json_normal(config, "run_config")
        if not (Path(out_dir) / MANIFEST).exists():
            return cls(out_dir, config, [])
        manifest = cls.load(out_dir)
        manifest.config = config
        return manifest

    @property
    def entries(self) -> list[dict]:
        return [dict(self._samples[k]) for k in sorted(self._samples)]

    def get(self, chain: int, index: int) -> dict | None:
        entry = self._samples.get((chain, index))
        return None if entry is None else dict(entry)

    def add(self, entry: dict) -> None:
        """Add or replace the entry of (chain, index). Indices are global: one chain each."""
        for chain, index in self._samples:
            if index == entry["index"] and chain != entry["chain"]:
                raise ValueError(f"sample index {index} already belongs to chain {chain}; "
                                 f"sample indices must be unique across chains")
        self._samples[(entry["chain"], entry["index"])] = dict(entry)

    def remove(self, chain: int, index: int) -> None:
        self._samples.pop((chain, index), None)

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"schema_version": SCHEMA_VERSION, "config": self.config,
                                      "samples": self.entries})
