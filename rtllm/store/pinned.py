"""Page-locked host buffers of exactly the size asked for.

`torch.empty(..., pin_memory=True)` goes through torch's caching host allocator, which rounds
every block up to a power of two: a 3.1 GB sample buffer takes 4 GiB (two of them: 8 GiB).
Here the memory is an ordinary host tensor of the exact size, registered with the CUDA driver
(cudaHostRegister) so copies to and from the GPU run asynchronously, and unregistered when the
tensor is freed.
"""
from __future__ import annotations

import weakref

import torch

_REGISTER_DEFAULT = 0  # cudaHostRegisterDefault


def pinned_empty(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` page-locked host bytes (no rounding up)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
    data = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes == 0:
        return data
    cudart = torch.cuda.cudart()
    ptr = data.data_ptr()
    err = cudart.cudaHostRegister(ptr, nbytes, _REGISTER_DEFAULT)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (error {int(err)}); "
                           f"lower the number of pending samples or free host memory")
    weakref.finalize(data, cudart.cudaHostUnregister, ptr)
    return data
