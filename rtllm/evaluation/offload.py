"""Samples larger than the device: accelerate's big-model dispatch, and OOM back-off.

`dispatch_offloaded` places a built model's modules by `accelerate.infer_auto_device_map`
under a memory budget and dispatches it (`accelerate.dispatch_model`): modules that do not fit
on the device stay in host memory, or on disk when the budget names no room for them, and are
brought to the device layer by layer in each forward. `load_dispatched` builds one sample so
(EnsembleForCausalLM holds each sample that way); `OffloadedLoader` gives `rtllm evaluate`
one dispatched sample at a time, in its order, removing each one's disk offload when the next
replaces it; `offload_memory` turns `--offload` / `--offload-host` into accelerate's budget. `forward_in_pieces` runs a forward over
windows in pieces and, on an out-of-memory error, retries the rest with smaller pieces
(the behaviour of `accelerate.utils.find_executable_batch_size`), remembering the size that fit.

What stays ours: the sampler builds its model on the meta device straight into the flat
buffers (rtllm/lm/model_io.py, rtllm/state/flat.py): parameters are views of one buffer that the
fused kernels update in place. accelerate's `init_empty_weights` / dispatch would give each
parameter its own storage (and hooks that move it), which the flat layout cannot use; dispatch
is for reading samples, not for sampling.
"""
from __future__ import annotations

import gc
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from rtllm.lm.out_of_memory import is_out_of_memory, release_memory
from rtllm.store.ensemble import Ensemble


def dispatch_offloaded(model: torch.nn.Module, max_memory: dict, offload_dir: Path | str | None = None
                       ) -> torch.nn.Module:
    """Dispatch `model` (built in host memory) by `max_memory` ({device: bytes}, e.g.
    {0: "2GiB", "cpu": "30GiB"}); modules mapped to "disk" are written to `offload_dir`. The
    placement is `model.hf_device_map`."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import offload_state_dict

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    disk = [name for name, where in device_map.items() if where == "disk"]
    if disk:
        if offload_dir is None:
            raise ValueError(f"max_memory {max_memory} leaves modules {disk[:3]} for the disk; give an "
                             f"offload directory, or more memory")
        state = {k: v for k, v in model.state_dict().items()
                 if any(n == "" or k == n or k.startswith(n + ".") for n in disk)}
        offload_state_dict(str(offload_dir), state)
    main = next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")
    model = dispatch_model(model, device_map, main_device=main,
                           offload_dir=str(offload_dir) if disk else None)
    model.hf_device_map = dict(device_map)
    return model


def main_device(model: torch.nn.Module):
    """Where a dispatched model computes: its first accelerator in the map, else the CPU."""
    return next((d for d in model.hf_device_map.values() if d not in ("cpu", "disk")), "cpu")


def load_dispatched(ensemble: Ensemble, index: int, dtype: torch.dtype, max_memory: dict,
                    offload_dir: Path | str | None) -> torch.nn.Module:
    """Sample `index` built in host memory in `dtype`, then dispatched by `max_memory`
    (its disk offload, if any, in `offload_dir`)."""
    model = ensemble.load_model(index, dtype=dtype, local_files_only=True).eval()
    return dispatch_offloaded(model, max_memory, offload_dir)


def offload_memory(device: torch.device, on_device: int, in_host: int | None = None) -> dict:
    """accelerate's max_memory for one sample: `on_device` bytes of its weights on the
    evaluation device; on a GPU the rest in host memory (`in_host` bytes, None: what is free),
    then on disk; on the CPU, where the host is the device, the rest on disk."""
    if device.type == "cpu":
        if in_host is not None:
            raise ValueError("on the CPU the device is the host memory: give --offload alone (the "
                             "bytes of each sample kept in memory; the rest goes to disk)")
        return {"cpu": int(on_device)}
    if device.type != "cuda":
        raise ValueError(f"offloading dispatches to a CUDA device or the CPU, not {device}")
    from accelerate.utils import get_max_memory

    host = get_max_memory()["cpu"] if in_host is None else int(in_host)
    return {device.index or 0: int(on_device), "cpu": host}


class OffloadedLoader:
    """One dispatched sample at a time, in the order `plan` (as SampleLoader, whose in-place
    copy cannot reach weights that live on disk): `model` is the loaded sample's own model."""

    def __init__(self, ensemble: Ensemble, plan: list[int], dtype: torch.dtype, max_memory: dict,
                 offload_dir: Path | str | None, *, loaded: int) -> None:
        self.ensemble, self.plan, self.dtype, self.max_memory = ensemble, plan, dtype, max_memory
        self.offload_dir = None if offload_dir is None else Path(offload_dir)
        self._pos = 0
        self.loaded = loaded
        self.model = load_dispatched(ensemble, loaded, dtype, max_memory, self._dir(loaded))

    def _dir(self, index: int) -> Path | None:
        return None if self.offload_dir is None else self.offload_dir / f"{index:06d}"

    def _drop(self) -> None:
        self.model = None  # its memory maps closed before its files go
        gc.collect()
        if self.offload_dir is not None:
            shutil.rmtree(self._dir(self.loaded), ignore_errors=True)

    def load_next(self) -> int:
        index = self.plan[self._pos]
        self._pos += 1
        self._drop()
        self.model = load_dispatched(self.ensemble, index, self.dtype, self.max_memory, self._dir(index))
        self.loaded = index
        return index

    def close(self) -> None:
        self._drop()


FORWARD_WINDOWS = 32  # windows per forward pass, until a forward runs out of memory


@dataclass
class PieceSize:
    """Windows per forward; lowered for good when a forward runs out of memory."""

    windows: int = FORWARD_WINDOWS


def forward_in_pieces(forward: Callable[[Tensor], Tensor], inputs: Tensor,
                      consume: Callable[[Tensor, int], None], size: PieceSize) -> None:
    """consume(forward(inputs[w:w + n]), w) for consecutive pieces covering `inputs`; after an
    out-of-memory error (as accelerate recognizes it) the forward is retried at half the size,
    the pieces already consumed are not repeated, and the size stays halved for later calls.
    The behaviour of accelerate's find_executable_batch_size, without its garbage collection
    on every call (this runs once per sample and chunk)."""
    done = 0
    while done < len(inputs):
        try:
            out = forward(inputs[done:done + size.windows])
        except Exception as e:
            if not is_out_of_memory(e) or size.windows == 1:
                raise
            out = None
        if out is None:  # outside the except block: the traceback no longer holds its tensors
            release_memory()
            size.windows //= 2
            continue
        consume(out, done)
        del out
        done = min(done + size.windows, len(inputs))
