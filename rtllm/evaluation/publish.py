"""The evaluation's output directory: staged, published with a completion marker, reused.

An evaluation is written into a staging directory inside `--out` (`.tmp-evaluation-*`) and
only then moved into place: the marker `evaluation.json` is removed first, the outputs of an
earlier evaluation are removed next, the new files are renamed in, and the marker is written
last. So `--out` holds one evaluation's files or, while the marker is absent, an incomplete
publication that the next run clears; a kill during the (minutes of) computation leaves the
earlier evaluation untouched. Other files in `--out` are never touched.

The marker records a fingerprint of the inputs (the ensemble's manifest, the texts' bytes, the
baseline's files, the options): a rerun with the same fingerprint reuses the evaluation.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from rtllm.store.manifest import _fsync_dir, atomic_write_json, rtllm_version, sha256_file

MARKER = "evaluation.json"
STAGING_PREFIX = ".tmp-evaluation-"
# Every file an evaluation may write: all of them go before a new evaluation is published.
OUTPUT_NAMES = ("summary.json", "summary_unmasked.json", "tokens.jsonl", "diagnostics.json",
                "reliability.png", "uncertainty_by_position.png", "tokens.html")
HASH_LIMIT = 256 << 20


def check_out_dir(out: Path) -> None:
    """Fail before any computation when `out` cannot receive the evaluation."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory (it is created if missing)")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"--out {out}: {probe} is a file, so the directory cannot be created; "
                         f"choose another --out")


def begin(out: Path) -> Path:
    """Create `out` and a fresh staging directory in it (clearing stale ones of killed runs);
    a read-only `out` fails here, before the evaluation starts."""
    out = Path(out)
    check_out_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = out / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        (staging / ".write-test").write_bytes(b"")  # a directory may be listable but not writable
    except OSError as err:
        raise ValueError(f"--out {out} is not writable ({err.strerror}); choose a directory you can "
                         f"write to") from None
    return staging


def publish(staging: Path, out: Path, fingerprint: str, inputs: dict) -> dict[str, Path]:
    """Move the files of `staging` into `out`, the marker last; returns name -> final path."""
    staging, out = Path(staging), Path(out)
    (staging / ".write-test").unlink(missing_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # from here until the end `out` reads as incomplete
    for name in OUTPUT_NAMES:
        (out / name).unlink(missing_ok=True)
    files = sorted(p.name for p in staging.iterdir())
    for name in files:
        os.replace(staging / name, out / name)
    _fsync_dir(out)
    shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(out / MARKER, {"fingerprint": fingerprint, "inputs": inputs, "files": files,
                                     "rtllm_version": rtllm_version()})
    return {name: out / name for name in files}


def discard(staging: Path, *, created_out: bool = False) -> None:
    """Remove a failed evaluation's staging directory, and `--out` too when this run created
    it and nothing else is there: a refused evaluation leaves the disk as it found it."""
    shutil.rmtree(staging, ignore_errors=True)
    if created_out:
        try:
            staging.parent.rmdir()
        except OSError:  # not empty: something else is there now
            pass


def completed(out: Path, fingerprint: str) -> list[Path] | None:
    """The files of the evaluation in `out` if it is complete and made from the same inputs."""
    try:
        marker = json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("fingerprint") != fingerprint:
        return None
    paths = [Path(out) / name for name in marker.get("files", [])]
    return paths if paths and all(p.is_file() for p in paths) else None


def _file_id(path: Path) -> str:
    """Content hash of a file; size and modification time of a big one (a 3 GB checkpoint
    would take longer to hash than a small evaluation takes to run)."""
    st = path.stat()
    return sha256_file(path) if st.st_size <= HASH_LIMIT else f"size {st.st_size}, mtime_ns {st.st_mtime_ns}"


def fingerprint(ensemble_dir: Path, texts: dict[str, str], ood_texts: dict[str, str],
                baseline: Path | None, options: dict, *, reference: dict[str, str] | None = None
                ) -> tuple[str, dict]:
    """A hash of everything the evaluation's numbers depend on, and its readable parts. Texts
    (path -> text; also the feature distance's `reference`) and the manifest (which holds every sample's sha256) by content, the
    baseline's files by `_file_id`."""
    text_hash = lambda t: hashlib.sha256(t.encode()).hexdigest()  # noqa: E731
    inputs = {
        "manifest_sha256": sha256_file(Path(ensemble_dir) / "ensemble.json"),
        "texts": {p: text_hash(t) for p, t in texts.items()},
        "ood_texts": {p: text_hash(t) for p, t in ood_texts.items()},
        "reference_texts": {p: text_hash(t) for p, t in (reference or {}).items()},
        "baseline": None if baseline is None else {
            p.name: _file_id(p) for p in sorted(Path(baseline).iterdir()) if p.is_file()},
        "options": options, "rtllm_version": rtllm_version(),
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return digest, inputs
