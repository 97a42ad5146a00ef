"""A device scalar read on the host without an extra sync in the sampling loop (moved out of
rtllm/run/sampling.py unchanged, to keep that module small)."""
from __future__ import annotations

import torch


class HostScalar:
    """A device scalar copied to pinned host memory without waiting for the GPU; float() waits
    only if the copy has not landed yet (after a later host sync on the stream, it has)."""

    def __init__(self, value: torch.Tensor) -> None:
        self._event = None
        if value.is_cuda:
            host = torch.empty((), dtype=value.dtype, pin_memory=True)
            stream = torch.cuda.current_stream(value.device)  # the copy's stream, whatever the current device
            with torch.cuda.stream(stream):
                host.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(stream)
            value = host
        self._value = value

    def __float__(self) -> float:
        if self._event is not None and not self._event.query():
            self._event.synchronize()
        return float(self._value)
