"""Chain checkpoints: everything a killed run needs to continue exactly where it was.

A checkpoint holds the sampler state (position, velocity, clock, ln_luminosity, seed, step
counter), the loop's step and data cursor, the chosen dt and the chain-defining configuration.
It is one safetensors file: the tensors in its data section, everything else as JSON in its
header metadata. No pickle: reading a checkpoint can never run code (a crafted file in an
output directory is only data). The tensors are written in slices of at most 64 MiB, so the
host never stages the whole state (17 GiB at GPT-2 XL). The write is atomic (temporary file,
fsync, rename): a kill leaves the previous checkpoint intact, never a torn one. Reading maps
the file: the tensors a load returns are views of its pages (read from disk as they are copied
into the sampler's buffers, page cache the kernel can drop), so a resume does not stage the
state in host memory either. The dt-auto trials snapshot the sampler through the same two
functions (`trial_snapshot_path`).
"""
from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import torch

from rtllm.store.manifest import _CHUNK, _ST_DTYPES, _fsync_dir
from rtllm.store.writer import _header, _Slot

CHECKPOINT_VERSION = 2  # 1 was a torch.save pickle: never read
_META_KEY = "rtllm_checkpoint"
_TMP_MARK = ".tmp-"


def checkpoint_path(out_dir: Path, chain: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"chain-{chain:03d}.safetensors"


def pickle_checkpoint_path(out_dir: Path, chain: int) -> Path:
    """Where rtllm before checkpoint version 2 left its (pickle) checkpoint."""
    return Path(out_dir) / "checkpoints" / f"chain-{chain:03d}.pt"


def trial_snapshot_path(ckpt_path: Path) -> Path:
    """Where a dt-auto trial parks the sampler state: beside the chain's checkpoint, named as a
    temporary of a killed write (remove_stale_temporaries clears it on the next claim)."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(f".{ckpt_path.stem}-dt-trial{_TMP_MARK}{os.getpid()}")


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


# -- JSON with the types a state needs -----------------------------------------------------------
# Plain JSON loses tuples, int dict keys and non-finite floats; tagged objects keep them, so a
# loaded state equals the saved one exactly (floats round-trip through repr bit for bit).
def _encode(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"__tensor__": f"t{len(tensors) - 1:06d}"}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if hasattr(obj, "item") and type(obj).__module__ == "numpy":  # numpy scalar
        return _encode(obj.item(), tensors)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"a checkpoint cannot hold a {type(obj).__name__} ({obj!r})")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


# -- write and read -----------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict, *, durable: bool = True) -> None:
    """Write `state` to `path` atomically; durable False skips the fsyncs (a scratch file that
    a crash makes worthless anyway: the dt-trial snapshot)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: list[torch.Tensor] = []
    meta = json.dumps({"version": CHECKPOINT_VERSION, "state": _encode(state, tensors)},
                      allow_nan=False, separators=(",", ":"))
    slots, offset = [], 0
    # Widest elements first, as the sample files: every tensor stays aligned in the file.
    for i in sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size()):
        t = tensors[i]
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"a checkpoint cannot hold a {t.dtype} tensor")
        n = t.numel() * t.element_size()
        slots.append(_Slot(f"t{i:06d}", t, t.dtype, tuple(t.shape), offset, offset + n, False))
        offset += n
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_header(slots, {"format": "pt", _META_KEY: meta}))
            for slot in slots:
                _write_sliced(f, slot.source)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)  # make the rename itself durable
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"writing the checkpoint {path} failed: the disk is full "
                          f"(the previous checkpoint is intact); free some space and resume the "
                          f"run with --resume") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_sliced(f, tensor: torch.Tensor) -> None:
    """The tensor's bytes, copied to the host one slice of at most _CHUNK bytes at a time."""
    flat = tensor.detach().reshape(-1)
    step = max(1, _CHUNK // max(1, flat.element_size()))
    for i in range(0, flat.numel(), step):
        piece = flat[i:i + step].to("cpu").contiguous()
        f.write(memoryview(piece.view(torch.uint8).numpy()))


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at `path`, or None when there is none (a fresh start).

    Its tensors are CPU views of the mapped file (copy-on-write: writing one never changes the
    file); copying them into device buffers reads the file page by page, with no host copy of
    the state. The file may be replaced or removed while they live (the mapping keeps it)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        return None
    remedy = "delete it to start the chain over (--overwrite), or restore it from a copy"
    try:
        with safe_open(path, framework="pt", device="cpu") as f:  # validates the header
            meta = (f.metadata() or {}).get(_META_KEY)
            names = list(f.keys())
        tensors = _mapped_tensors(path, names)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path} cannot be read ({reason}); {remedy}") from None
    try:
        saved = json.loads(meta)
        version = saved.get("version")
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"checkpoint {path} holds no rtllm state; {remedy}") from None
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is a version {version} checkpoint; this rtllm reads version "
                         f"{CHECKPOINT_VERSION}: start a new run (without --resume)")
    try:
        return _decode(saved["state"], tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {path} is damaged ({type(err).__name__}: {err}); {remedy}") from None


def _mapped_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors file (header already validated) as views of its pages."""
    codes = {code: dtype for dtype, code in _ST_DTYPES.items()}
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        size = os.fstat(f.fileno()).st_size
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    out = {}
    for name in names:
        entry = header[name]
        dtype = codes[entry["dtype"]]
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        if count == 0:
            out[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + length + begin)
        out[name] = flat.view(entry["shape"])
    return out


def read_run_state(path: Path) -> dict | None:
    """The run's plain state (step, world size, ...) from a checkpoint's header, its tensors left
    unread; None when there is none or it cannot be read (load_checkpoint then says why)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            saved = json.loads((f.metadata() or {}).get(_META_KEY))
        state = saved["state"]["state"]
    except Exception:  # noqa: BLE001 - any unreadable file: the full load reports it
        return None
    return state if isinstance(state, dict) else None


def remove_stale_temporaries(checkpoint_dir: Path) -> list[Path]:
    """Delete `.NAME.tmp-PID` files that killed checkpoint writes left; returns them.

    Call only while holding the run's lock: then no other process is writing one."""
    folder = Path(checkpoint_dir)
    stale = sorted(folder.glob(f".chain-*{_TMP_MARK}*")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
