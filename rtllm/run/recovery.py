"""Before a run writes: claim its output directory, and check what `--resume` would continue.

- Only a directory this tool made (its run marker) is resumed or overwritten; a folder of user
  files or another model's directory is refused before anything in it changes.
- The directory is locked for the whole run (rtllm.store.lock): one writer at a time.
- A resume removes what killed writes left behind, compares the chain's settings with the
  checkpoint's (paths compared resolved, so `out/x` and `/abs/out/x` agree), and refuses to
  report "done" over listed samples it cannot re-create (missing or changed files).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from rtllm.run.checkpoint import pickle_checkpoint_path, remove_stale_temporaries
from rtllm.store.lock import LOCK_FILE, DirectoryLock
from rtllm.store.manifest import MANIFEST, RUN_MARKER, Manifest, sha256_file

PATH_SETTINGS = ("model", "init", "train", "heldout")


def _contents(out: Path) -> list[Path]:
    """What the directory holds besides our lock file (a run killed at start-up leaves only it)."""
    return [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []


def claim_out_dir(out: Path, *, resume: bool, overwrite: bool) -> DirectoryLock:
    """Check `out` for this run, lock it, clear it for --overwrite; returns the held lock.

    Every refusal happens before anything in `out` is created or changed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    if not (out / RUN_MARKER).is_file():
        _check_ours(out, resume, overwrite)  # not ours: refused before anything is created in it
    # An rtllm run is locked first, so a run still writing it is named rather than "not empty".
    out.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(out)
    try:
        _check_ours(out, resume, overwrite)  # again: another run may have written it meanwhile
        if overwrite and not resume:
            for p in _contents(out):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def _check_ours(out: Path, resume: bool, overwrite: bool) -> None:
    contents = _contents(out)
    if not contents:
        return
    ours = (out / RUN_MARKER).is_file()
    if resume and not ours:
        raise ValueError(f"--resume: {out} is not an rtllm run (no {RUN_MARKER}) and is not empty; "
                         f"nothing in it was changed: give the --out of the run to continue")
    if not resume and not overwrite:
        raise ValueError(f"--out {out} is not empty: pass --resume to continue its run or "
                         f"--overwrite to replace it")
    if not resume and not ours:
        raise ValueError(f"--out {out} is not empty and holds no rtllm run ({RUN_MARKER}); "
                         f"--overwrite only replaces rtllm outputs: choose another directory")


def prepare_resume(out: Path, chain: int) -> None:
    """Start-of-resume housekeeping (the lock is held): leftovers of killed writes go, and a
    pickle checkpoint of an older rtllm is refused rather than read."""
    remove_stale_temporaries(Path(out) / "checkpoints")
    old = pickle_checkpoint_path(out, chain)
    if old.exists():
        raise ValueError(f"{old} is a pickle checkpoint of an older rtllm; rtllm never unpickles "
                         f"(a pickle can run code): start a new run with --overwrite")


def settings_differ(saved: dict, current: dict) -> list[str]:
    """The chain-defining settings that differ; paths are compared after resolving them."""
    def norm(key, value):
        if key not in PATH_SETTINGS or value is None:
            return value
        if isinstance(value, (list, tuple)):
            return tuple(str(Path(v).expanduser().resolve()) for v in value)
        return str(Path(value).expanduser().resolve())

    return sorted(k for k in saved.keys() | current.keys()
                  if norm(k, saved.get(k)) != norm(k, current.get(k)))


def check_listed_samples(out: Path, chain: int, resume_step: int) -> None:
    """ValueError naming every listed sample of `chain` taken at or before `resume_step` whose
    files are missing or changed: the resumed chain starts after them, so it cannot re-write
    them (the later ones it re-writes itself)."""
    out = Path(out)
    if not (out / MANIFEST).is_file():
        return
    bad = []
    for entry in Manifest.load(out).entries:
        if entry["chain"] != chain or not isinstance(entry.get("step"), int) or entry["step"] > resume_step:
            continue
        problem = sample_problem(out, entry)
        if problem:
            bad.append(f"{entry['index']} ({problem})")
    if bad:
        raise ValueError(f"--resume cannot re-create sample(s) {', '.join(bad)}: the checkpoint "
                         f"(step {resume_step}) is past them; restore their files, or start a new "
                         f"run with --overwrite")


def sample_problem(out: Path, entry: dict) -> str | None:
    """None when every file the manifest lists for the sample is there with its hash."""
    sample_dir = out / str(entry["path"])
    files = entry.get("files") or {"model.safetensors": entry["sha256"]}
    for name, digest in sorted(files.items()):
        path = sample_dir / name
        if not path.is_file():
            return f"{entry['path']}/{name} is missing"
        if sha256_file(path) != digest:
            return f"{entry['path']}/{name} changed"
    return None
