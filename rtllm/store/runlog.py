"""The run's JSON-lines log: one record per step, dt trial, probe and checkpoint.

Timing and memory live here, never in the manifest or the sample files (those must be
byte-identical between a resumed run and an uninterrupted one).
"""
from __future__ import annotations

import json
import math
import resource
import sys
import warnings
from pathlib import Path

import torch


def _clean(value):
    """JSON has no NaN/inf: write them as strings so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RunLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(self.path)  # a resumed run appends after complete lines only
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(_clean(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def drop_torn_tail(path: Path) -> int:
    """Cut a last line that a kill or a full disk left without its newline; the bytes removed."""
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, 2)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep = 0
        for start in range(size, 0, -(1 << 16)):  # back to the last newline, 64 KiB at a time
            f.seek(max(0, start - (1 << 16)))
            block = f.read(start - max(0, start - (1 << 16)))
            if b"\n" in block:
                keep = max(0, start - (1 << 16)) + block.rindex(b"\n") + 1
                break
        f.truncate(keep)
        return size - keep


def read_log(path: Path) -> list[dict]:
    """The log's records. A torn last line (the writer was killed mid-line) is skipped with a
    warning; a broken line anywhere else is an error naming it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                warnings.warn(f"{path}: skipped the torn last line {n} (the run was stopped mid-write)",
                              stacklevel=2)
                break
            raise ValueError(f"{path} line {n} is not JSON; the log is damaged: restore it, or "
                             f"delete the line") from None
    return records


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
