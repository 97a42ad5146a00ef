"""Fused step kernels (Triton) next to their plain-torch references.

`philox` and `reference` need only torch; the Triton launchers (`reduce_sums`, `fused_update_`)
are imported on first access so this package imports where Triton is missing.

May import: torch, triton. The bottom room: imports no other part of rtllm.
"""

from .philox import STREAM_INIT, STREAM_REFRESH, philox_normals
from .reference import SUM_NAMES, fused_update_ref_, reduce_sums_ref

__all__ = [
    "STREAM_INIT",
    "STREAM_REFRESH",
    "SUM_NAMES",
    "philox_normals",
    "reduce_sums_ref",
    "fused_update_ref_",
    "reduce_sums",
    "fused_update_",
]

_TRITON_NAMES = ("reduce_sums", "fused_update_", "BLOCK")


def __getattr__(name: str):
    if name in _TRITON_NAMES:
        from . import triton_step  # needs triton; TRITON_INTERPRET must be set before this on CPU

        return getattr(triton_step, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
