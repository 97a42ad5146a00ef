"""Sample storage: each posterior sample as a Hugging Face model directory, listed in ensemble.json.

Layout of an output directory OUT:

    OUT/ensemble.json                 manifest (schema 1): run config + one entry per sample
    OUT/tokenizer.json, ...           tokenizer files (`copy_tokenizer`)
    OUT/samples/000003/config.json    model config (dtype set to the stored dtype)
    OUT/samples/000003/model.safetensors
    OUT/samples/000003/tokenizer.json, generation_config.json, ...   (`sample_dir_companions`)

so `AutoModelForCausalLM.from_pretrained("OUT/samples/000003")`, `AutoTokenizer` and
`pipeline("text-generation", model=...)` all work on sample 3 alone. Sample indices
are global across chains (one directory per index). Every write goes to a temporary sibling,
is fsynced, then renamed into place, and the manifest lists a sample only after its bytes were
re-read and matched the sha256 computed while writing: a crash or a full disk never leaves a
listed sample that is incomplete.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import queue
import shutil
import struct
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping

import torch
from torch import Tensor

from rtllm.store.manifest import (  # noqa: F401 (re-exported: the storage API)
    MANIFEST, SAMPLES, SCHEMA_VERSION, WEIGHTS, Manifest, _fsync_dir, _json_normal, atomic_write_bytes,
    atomic_write_json, check_free_disk, copy_tokenizer, estimate_run_disk, rtllm_version, sha256_file)
from rtllm.store.manifest import _CHUNK, _ST_DTYPES, _TMP_PREFIX
from rtllm.store.sample_dir import GENERATION_CONFIG, link_or_copy, sample_dir_companions
from rtllm.store.delta import PLAIN, DeltaCodec, ensure_start
from rtllm.store.pinned import pinned_empty


# -- safetensors layout ---------------------------------------------------------------------------
@dataclass
class _Slot:
    name: str
    source: Tensor  # the live tensor, read at every snapshot (or once, when frozen)
    dtype: torch.dtype  # stored dtype
    shape: tuple[int, ...]
    begin: int  # byte range in the data section
    end: int
    frozen: bool


def _unique_tensors(named_tensors: Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
    """Drop a name whose tensor is the very same view as an earlier one's (tied weights), as
    save_pretrained does. Flat buffers put every parameter in one storage, so sharing a storage
    is not enough: the view (pointer, dtype, shape, strides) must match."""
    seen, kept = set(), []
    for name, t in named_tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"named_tensors[{name!r}] is a {type(t).__name__}, not a tensor")
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        kept.append((name, t))
    return kept


def _layout(named: list[tuple[str, Tensor]], sample_dtype: torch.dtype | None,
            frozen: Collection[str]) -> tuple[list[_Slot], int]:
    """Widest elements first (as the safetensors library does), so every tensor is aligned."""
    entries = []
    for name, t in named:
        dtype = sample_dtype if sample_dtype is not None and t.is_floating_point() else t.dtype
        if dtype not in _ST_DTYPES:
            raise TypeError(f"{name} has dtype {dtype}, which safetensors cannot store")
        entries.append((name, t, dtype))
    entries.sort(key=lambda e: (-e[2].itemsize, e[0]))
    slots, offset = [], 0
    for name, t, dtype in entries:
        n = t.numel() * dtype.itemsize
        slots.append(_Slot(name, t, dtype, tuple(t.shape), offset, offset + n, name in frozen))
        offset += n
    return slots, offset


def _header(slots: list[_Slot], metadata: dict[str, str]) -> bytes:
    """The safetensors header: u64 length + JSON, padded with spaces to 8 bytes. Our own encoder
    because the library orders __metadata__ by a per-process hash seed: identical samples from a
    resumed run would not be byte-identical."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    for s in slots:
        header[s.name] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [s.begin, s.end]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


# -- the writer ---------------------------------------------------------------------------------
class SampleWriteError(RuntimeError):
    """A sample could not be written; its temporary files are gone, the manifest is intact."""


@dataclass
class _Buffer:
    data: Tensor  # uint8 host bytes laid out as the safetensors data section
    views: list[Tensor]  # one typed view per slot
    event: Any = None  # torch.cuda.Event: the snapshot copy has landed


@dataclass
class _Job:
    buf: _Buffer
    index: int
    chain: int
    step: int
    loss: float | None
    heldout_loss: float | None
    masked: bool


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None  # JSON has no NaN/inf


def _check_index(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


class SampleWriter:
    """Snapshot live weights at `submit` and write them on a background thread.

    named_tensors: state-dict names -> live tensors, in state-dict order; tied duplicates are
    dropped by view identity, so give the tensors as they are after the sampler was built.
    sample_dtype: None stores each tensor's own dtype; a float dtype casts floating tensors (to
    store fp32 master weights of a bf16 model, pass views of the master buffer instead).
    frozen: names whose tensors never change; copied once per host buffer, not per sample.
    sample_format: "safetensors" (each sample a from_pretrained directory) or a compressed
    format of rtllm.store.delta ("delta8", "nf4"): offsets from the weights as they are now,
    which are written once to OUT/start/ (kept on resume).
    At most `max_pending` snapshots are in flight; `submit` blocks when all are.
    """

    def __init__(self, out_dir: Path, *, model_config, named_tensors: Mapping[str, Tensor],
                 sample_dtype: torch.dtype | None, run_config: dict, max_pending: int = 2,
                 frozen: Collection[str] = (), generation_config=None, sample_format: str = PLAIN) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; this host is not")
        if sample_dtype is not None and not sample_dtype.is_floating_point:
            raise ValueError(f"sample_dtype must be None or a floating dtype, got {sample_dtype}")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        unknown = set(frozen) - set(named_tensors)
        if unknown:
            raise ValueError(f"frozen names {sorted(unknown)} are not in named_tensors")
        self.out_dir = Path(out_dir)
        self._samples_dir = self.out_dir / SAMPLES
        self._manifest = Manifest.open(self.out_dir, run_config)
        self._slots, self._nbytes = _layout(_unique_tensors(named_tensors), sample_dtype, frozen)
        floats = {s.dtype for s in self._slots if s.dtype.is_floating_point}
        self.dtype_name = str(floats.pop()).removeprefix("torch.") if len(floats) == 1 else "mixed"
        self._config = copy.deepcopy(model_config)
        if self.dtype_name != "mixed":  # from_pretrained(dtype="auto") reads it
            self._config.dtype = getattr(torch, self.dtype_name)
        self._config_json = self._config.to_json_string().encode()
        # generation_config.json makes pipeline("text-generation") on a sample behave as on the model.
        self._generation_json = generation_config.to_json_string().encode() \
            if generation_config is not None else None
        self._run_config_json = json.dumps(self._manifest.config, sort_keys=True)
        cuda = {s.source.device for s in self._slots if s.source.is_cuda}
        if len(cuda) > 1:
            raise ValueError(f"live tensors span CUDA devices {sorted(map(str, cuda))}; "
                             f"one writer snapshots one device")
        self._device = cuda.pop() if cuda else None
        self._stream = torch.cuda.Stream(self._device) if self._device is not None else None
        self._last_event = None
        self._max_pending, self._n_buffers = max_pending, 0
        self._free: queue.Queue[_Buffer] = queue.Queue()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._index_chain = {e["index"]: e["chain"] for e in self._manifest.entries}
        self._error: SampleWriteError | None = None
        self._closed = False
        self._samples_dir.mkdir(parents=True, exist_ok=True)
        for stale in self._samples_dir.glob(_TMP_PREFIX + "*"):  # from a run that crashed
            shutil.rmtree(stale, ignore_errors=True)
        self._manifest.save()
        self._codec = None if sample_format == PLAIN else DeltaCodec(sample_format)
        if self._codec is not None:
            start = {s.name: s.source.detach().to("cpu", s.dtype, copy=True) for s in self._slots}
            self._start, self._start_sha256 = ensure_start(self.out_dir, self._config_json, start)
        self._thread = threading.Thread(target=self._run, name="rtllm-sample-writer", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, out_dir: Path, model: torch.nn.Module, **kwargs) -> "SampleWriter":
        """Writer over `model.state_dict(keep_vars=True)`; parameters that do not require grad
        are frozen. Build it after the sampler, so the parameters already are buffer views."""
        named = model.state_dict(keep_vars=True)
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False)
                  if not p.requires_grad}
        config = copy.deepcopy(model.config)
        if not getattr(config, "architectures", None):  # save_pretrained fills it; vLLM needs it
            config.architectures = [type(model).__name__]
        kwargs.setdefault("generation_config", getattr(model, "generation_config", None))
        return cls(out_dir, model_config=config, named_tensors=named, frozen=frozen, **kwargs)

    @property
    def bytes_per_sample(self) -> int:
        """Size of one model.safetensors (for estimate_run_disk)."""
        return len(_header(self._slots, self._metadata(0, 0, 0))) + self._nbytes

    # -- main thread --------------------------------------------------------------------------
    def submit(self, *, index: int, chain: int, step: int, loss: float | None,
               heldout_loss: float | None, masked: bool = False) -> None:
        """Snapshot the live tensors now; the sample is written in the background. On CUDA the
        copy runs on a side stream: call wait_snapshot() before the next in-place update."""
        if self._closed:
            raise RuntimeError("submit() after close(); make a new SampleWriter")
        self._raise_error()
        for name, value in (("index", index), ("chain", chain), ("step", step)):
            _check_index(name, value)
        owner = self._index_chain.setdefault(index, chain)
        if owner != chain:
            raise ValueError(f"sample index {index} already belongs to chain {owner}; sample "
                             f"indices must be unique across chains")
        buf = self._take_buffer()
        self._snapshot(buf)
        self._jobs.put(_Job(buf, index, chain, step, _finite_or_none(loss),
                            _finite_or_none(heldout_loss), bool(masked)))

    def update_config(self, run_config: dict) -> None:
        """Replace the run config (e.g. once dt is chosen): ensemble.json is rewritten now and
        samples submitted from here on carry it in their metadata."""
        self.flush()  # the writer thread is idle: the manifest is ours to change
        self._manifest.config = _json_normal(run_config, "run_config")
        self._run_config_json = json.dumps(self._manifest.config, sort_keys=True)
        self._manifest.save()

    def wait_snapshot(self) -> None:
        """Make the current CUDA stream wait for the last snapshot copy: call before the next
        in-place update of the weights. Nothing to wait for on CPU (the copy is synchronous)."""
        if self._last_event is not None:
            torch.cuda.current_stream(self._device).wait_event(self._last_event)

    @property
    def pending(self) -> int:
        """Samples submitted but not yet on disk (0 once the writer thread has stopped)."""
        return self._jobs.unfinished_tasks if self._thread.is_alive() else 0

    def flush(self) -> None:
        """Wait until every submitted sample is written; re-raise a writer error."""
        self._jobs.join()
        self._raise_error()

    def close(self) -> list[dict]:
        """Finish pending writes, stop the thread, re-raise a writer error; the manifest entries."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
            self._thread.join()
        self._raise_error()
        return self._manifest.entries

    def __enter__(self) -> "SampleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:  # keep the samples already snapshotted; the body's exception is the one to see
            self.close()
        except SampleWriteError as e:
            if e is not exc and hasattr(exc, "add_note"):
                exc.add_note(f"the sample writer also failed: {e}")

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _take_buffer(self) -> _Buffer:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._n_buffers < self._max_pending:
            self._n_buffers += 1
            return self._new_buffer()
        while True:  # all in flight: wait for the writer to hand one back
            try:
                return self._free.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the sample writer thread died") from self._error

    def _new_buffer(self) -> _Buffer:
        # Pinned at its exact size (torch's pinned allocator would round it up to a power of two).
        data = pinned_empty(self._nbytes) if self._device is not None else \
            torch.empty(self._nbytes, dtype=torch.uint8)
        views = [data[s.begin:s.end].view(s.dtype).view(s.shape) for s in self._slots]
        with torch.no_grad():
            for s, view in zip(self._slots, views):
                if s.frozen:  # never changes: once per buffer is enough
                    view.copy_(s.source)
        event = torch.cuda.Event() if self._device is not None else None
        return _Buffer(data, views, event)

    @torch.no_grad()
    def _snapshot(self, buf: _Buffer) -> None:
        live = [(s.source, v) for s, v in zip(self._slots, buf.views) if not s.frozen]
        if self._stream is None:
            for src, dst in live:
                dst.copy_(src)
            return
        # Side stream: the copy starts after the weights' last update and overlaps the next
        # forward; the next in-place update waits on the event (wait_snapshot), nothing else.
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            for src, dst in live:
                dst.copy_(src, non_blocking=src.is_cuda)
            buf.event.record(self._stream)
        self._last_event = buf.event

    # -- writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None:  # after a failure the run is over: write nothing more
                    self._write(job)
            except BaseException as e:
                target = self._samples_dir / f"{job.index:06d}"
                reason = ("the disk is full" if isinstance(e, OSError) and e.errno == errno.ENOSPC
                          else f"{type(e).__name__}: {e}")
                err = SampleWriteError(
                    f"writing sample {job.index} (chain {job.chain}, step {job.step}) to {target} "
                    f"failed: {reason}. Its temporary files were removed and {MANIFEST} lists only "
                    f"complete samples; fix the cause (free disk space if it is full) and resume "
                    f"the run")
                err.__cause__ = e
                self._error = err
            finally:
                self._free.put(job.buf)
                self._jobs.task_done()
        self._jobs.task_done()

    def _metadata(self, index: int, chain: int, step: int) -> dict[str, str]:
        # Strings only (safetensors metadata); no timings, so a resumed run rewrites same bytes.
        return {"format": "pt", "rtllm_version": rtllm_version(), "sample_index": str(index),
                "chain": str(chain), "step": str(step), "rtllm_config": self._run_config_json}

    def _write(self, job: _Job) -> None:
        if job.buf.event is not None:
            job.buf.event.synchronize()
        name = f"{job.index:06d}"
        final = self._samples_dir / name
        tmp = self._samples_dir / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            _write_synced(tmp / "config.json", [self._config_json])
            if self._generation_json is not None:
                _write_synced(tmp / GENERATION_CONFIG, [self._generation_json])
            for src in sample_dir_companions(self.out_dir):  # the tokenizer: a sample is a whole model
                link_or_copy(src, tmp / src.name)
            metadata = self._metadata(job.index, job.chain, job.step)
            header, data, extra = self._encoded(job.buf, metadata)
            data = memoryview(data.numpy())
            chunks = [header] + [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)]
            digest = _write_synced(tmp / extra.get("file", WEIGHTS), chunks)
            _fsync_dir(tmp)
            weights = extra.get("file", WEIGHTS)
            if sha256_file(tmp / weights) != digest:
                raise OSError(errno.EIO, f"{tmp / weights} reads back different bytes")
            files = sample_file_hashes(tmp, known={weights: digest})
            old = self._manifest.get(job.chain, job.index)
            if old is not None and (old["sha256"] != digest or old.get("files") != files):
                # Unlist first: the manifest must never name a file whose hash it does not match.
                self._manifest.remove(job.chain, job.index)
                self._manifest.save()
            _install(tmp, final, extra.get("file", WEIGHTS))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._manifest.add({
            "index": job.index, "chain": job.chain, "step": job.step,
            "path": f"{SAMPLES}/{name}", "sha256": digest, "dtype": self.dtype_name,
            "loss": job.loss, "heldout_loss": job.heldout_loss, "masked": job.masked,
            "files": files, **extra})
        self._manifest.save()

    def _encoded(self, buf: _Buffer, metadata: dict[str, str]) -> tuple[bytes, Tensor, dict]:
        """(header, data bytes, extra manifest fields) of the file to write for `buf`."""
        if self._codec is None:
            return _header(self._slots, metadata), buf.data, {}
        named = {s.name: v for s, v in zip(self._slots, buf.views)}
        stored, errors = self._codec.encode(named, self._start)
        slots, nbytes = _layout(list(stored.items()), None, ())
        data = torch.empty(nbytes, dtype=torch.uint8)
        for s in slots:
            data[s.begin:s.end].view(s.dtype).view(s.shape).copy_(s.source)
        fields = {**self._codec.manifest_fields(), "start_sha256": self._start_sha256, **errors}
        metadata = {**metadata, "rtllm_format": self._codec.format,
                    "rtllm_block_size": str(self._codec.block_size)}
        return _header(slots, metadata), data, fields


def _write_synced(path: Path, chunks: list) -> str:
    """Write chunks, fsync, and return the sha256 of exactly the bytes written."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            h.update(chunk)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def sample_file_hashes(sample_dir: Path, known: Mapping[str, str] | None = None) -> dict[str, str]:
    """sha256 of every file in a sample directory, by name (`known`: digests already computed)."""
    known = known or {}
    return {p.name: known.get(p.name) or sha256_file(p)
            for p in sorted(Path(sample_dir).iterdir()) if p.is_file()}


def _install(tmp: Path, final: Path, weights: str = WEIGHTS) -> None:
    """Move a complete sample directory into place. A new index: one directory rename. An
    existing one: rename(2) cannot replace a non-empty directory, so each file is replaced
    atomically (config and tokenizer first, weights last): a reader sees complete files at every
    moment."""
    if not final.exists():
        os.rename(tmp, final)
    else:
        for path in sorted(tmp.iterdir(), key=lambda p: (p.name == weights, p.name)):
            os.replace(path, final / path.name)
        _fsync_dir(final)
    _fsync_dir(final.parent)
