"""Samples larger than the device: accelerate's big-model dispatch, and OOM back-off.

`dispatch_offloaded` places a built model's modules by `accelerate.infer_auto_device_map`
under a memory budget and dispatches it (`accelerate.dispatch_model`): modules that do not fit
on the device stay in host memory, or on disk when the budget names no room for them, and are
brought to the device layer by layer in each forward. `forward_in_pieces` runs a forward over
windows in pieces and, on an out-of-memory error, retries the rest with smaller pieces
(the behaviour of `accelerate.utils.find_executable_batch_size`), remembering the size that fit.

What stays ours: the sampler builds its model on the meta device straight into the flat
buffers (rtllm/lm/model_io.py, rtllm/state/flat.py): parameters are views of one buffer that the
fused kernels update in place. accelerate's `init_empty_weights` / dispatch would give each
parameter its own storage (and hooks that move it), which the flat layout cannot use; dispatch
is for reading samples, not for sampling.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from rtllm.lm.out_of_memory import is_out_of_memory, release_memory


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


@dataclass
class PieceSize:
    """Windows per forward; lowered for good when a forward runs out of memory."""

    windows: int


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
