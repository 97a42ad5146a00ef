"""Chain checkpoints: everything a killed run needs to continue exactly where it was.

A checkpoint holds the sampler state (position, velocity, clock, ln_luminosity, seed, step
counter), the loop's step and data cursor, the chosen dt and the chain-defining configuration.
It is written atomically (temporary file, fsync, rename), so a kill during the write leaves the
previous checkpoint intact and never a truncated file under the final name.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT_VERSION = 1


def checkpoint_path(out_dir: Path, chain: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"chain-{chain:03d}.pt"


def map_tensors(obj, fn):
    """`obj` with fn applied to every tensor inside its dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def cloned(state):
    """A deep copy of a state's tensors (a sampler's state_dict holds live references)."""
    return map_tensors(state, torch.Tensor.clone)


def save_checkpoint(path: Path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"version": CHECKPOINT_VERSION, **map_tensors(state, lambda t: t.detach().to('cpu', copy=True))}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at `path`, or None when there is none (a fresh start)."""
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is a version {state.get('version')} checkpoint; this rtllm reads "
                         f"version {CHECKPOINT_VERSION}: start a new run (without --resume)")
    return state
