"""Out-of-memory errors as accelerate recognizes them, for the rooms that back off on them.

`is_out_of_memory` is `accelerate.utils.memory.should_reduce_batch_size`: a RuntimeError whose
message says the device (CUDA, HIP, XPU, MPS) or the CPU allocator ran out of memory. It reads
the message, not the class, so it holds for every torch the project allows (torch 2.4 raises
`torch.cuda.OutOfMemoryError`, a RuntimeError; the device-generic `torch.OutOfMemoryError` is
newer). `release_memory` frees what the failed attempt left cached, before the smaller retry.
"""
from __future__ import annotations


def is_out_of_memory(err: BaseException) -> bool:
    from accelerate.utils.memory import should_reduce_batch_size

    return should_reduce_batch_size(err)


def release_memory() -> None:
    """Collect the failed attempt's garbage and empty the device cache (slow: call on OOM only,
    after the `except` block, so that the traceback no longer holds its tensors)."""
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)
