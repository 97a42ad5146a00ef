"""Pinned sample buffers take exactly their size (torch's pinned allocator rounds up to a power
of two: a 3.1 GB GPT-2 XL sample took 4 GiB). No GPU here: the CUDA runtime is mocked and the
test checks what is registered, and that it is unregistered when the buffer is freed."""
from __future__ import annotations

import gc

import pytest
import torch

from rtllm.store.pinned import pinned_empty


class FakeCudart:
    def __init__(self):
        self.registered: dict[int, int] = {}

    def cudaHostRegister(self, ptr, size, flags):
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr):
        del self.registered[ptr]
        return 0


def test_pinned_buffer_is_registered_at_its_exact_size(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    n = 3_000_001  # far from a power of two
    buf = pinned_empty(n)
    assert buf.numel() == n and buf.dtype == torch.uint8
    assert fake.registered == {buf.data_ptr(): n}
    del buf
    gc.collect()
    assert fake.registered == {}


def test_registration_failure_says_what_to_do(monkeypatch):
    class Failing(FakeCudart):
        def cudaHostRegister(self, ptr, size, flags):
            return 2  # cudaErrorMemoryAllocation
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Failing())
    with pytest.raises(RuntimeError, match="cudaHostRegister of 17 bytes failed"):
        pinned_empty(17)
