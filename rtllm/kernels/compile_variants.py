"""Every kernel variant the backends launch, as calls of the real launchers (for compile_check).

Each entry calls `triton_step.reduce_sums` / `fused_update_` the way rtllm.state.backends does
for one kind of shard; under `compile_check.compile_only()` that compiles the variant for a GPU
target without running it. Shards are 4096 elements (a multiple of 16, 16-byte aligned as every
allocation is) unless the name says otherwise; "misaligned" shards start at offset % 4 == 1.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

from . import triton_segments, triton_step

N = 4096
KEY = dict(seed=0x5EED_0000_1234, step=7, stream=1)
BIG_KEY = dict(seed=2**64 - 5, step=2**32 + 7, stream=2**31 + 1)  # 64-bit words everywhere
COEF = dict(alpha=0.9, beta=-0.3, gamma=0.2, delta=0.05)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _state(grad: str = "fp32", compute: str | None = None, split: bool = False):
    x = torch.zeros(N, dtype=torch.bfloat16 if split else torch.float32)
    v, g = torch.zeros(N), torch.zeros(N, dtype=_DTYPES[grad])
    c = None if compute is None else torch.zeros(N, dtype=_DTYPES[compute])
    lo = torch.zeros(N, dtype=torch.int16) if split else None
    return x, v, g, c, lo


def _reduce(grad: str, noise: bool, offset: int = 0, key: dict = KEY) -> Callable[[], None]:
    def launch() -> None:
        _, v, g, _, _ = _state(grad)
        triton_step.reduce_sums(v, g, offset=offset, noise=noise, **key)
    return launch


def _update(grad: str, compute: str | None, noise: bool, *, split: bool = False, offset: int = 0,
            key: dict = KEY, precond: bool = False) -> Callable[[], None]:
    def launch() -> None:
        x, v, g, c, lo = _state(grad, compute, split)
        p = torch.ones(N) if precond else None
        triton_step.fused_update_(x, v, g, c, x_lo=lo, offset=offset, noise=noise, precond=p, **COEF, **key)
    return launch


def _velocity_draw() -> None:
    """As _PhiloxBackend.draw_velocity: v <- scale * n through the update pass."""
    x, v, _, _, _ = _state()
    triton_step.fused_update_(x, v, v, None, alpha=0.0, beta=0.0, gamma=1.0, delta=0.0,
                              seed=KEY["seed"], step=0, stream=0, offset=0, noise=True)


def _segments(grad: str, compute: str | None, *, split: bool = False, mod: int = 0, precond: bool = False):
    """Two shards of one kind, as rtllm.state.segment_launch groups them."""
    shards = [SimpleNamespace(**dict(zip(("x", "v", "g", "compute", "x_lo"), _state(grad, compute, split))),
                              precond=torch.ones(N) if precond else None) for _ in range(2)]
    return triton_segments.build_segments(shards, [4 + mod, 4 + N + 4 + mod])


def _segment_reduce(grad: str, noise: bool, mod: int = 0) -> Callable[[], None]:
    def launch() -> None:
        triton_segments.reduce_segments(_segments(grad, None, mod=mod), noise=noise, **KEY)
    return launch


def _segment_update(grad: str, compute: str | None, noise: bool, *, split: bool = False,
                    mod: int = 0, precond: bool = False) -> Callable[[], None]:
    def launch() -> None:
        coef = torch.zeros((2, 3))
        triton_segments.update_segments(_segments(grad, compute, split=split, mod=mod, precond=precond), coef,
                                        delta=0.05, noise=noise, **KEY)
    return launch


VARIANTS: dict[str, Callable[[], None]] = {
    **{f"reduce grad={g} noise": _reduce(g, True) for g in _DTYPES},
    "reduce grad=fp32 no-noise": _reduce("fp32", False),
    **{f"update grad={g} compute={c} noise": _update(g, c, True)
       for g in _DTYPES for c in (None, "fp32", "bf16", "fp16")},
    "update grad=fp32 compute=None no-noise": _update("fp32", None, False),
    "update grad=bf16 fp32-split noise": _update("bf16", None, True, split=True),
    "update grad=bf16 fp32-split no-noise": _update("bf16", None, False, split=True),
    "velocity draw": _velocity_draw,
    "reduce offset>2^32 64-bit key": _reduce("fp32", True, offset=2**33 + 4096, key=BIG_KEY),
    "update offset>2^32 64-bit key": _update("bf16", "bf16", True, offset=2**33 + 4096, key=BIG_KEY),
    "reduce misaligned": _reduce("fp32", True, offset=4097),
    "update misaligned": _update("fp32", None, True, offset=4097),
    **{f"segments reduce grad={g} noise": _segment_reduce(g, True) for g in _DTYPES},
    "segments reduce grad=fp32 no-noise": _segment_reduce("fp32", False),
    **{f"segments update grad={g} compute={c} noise": _segment_update(g, c, True)
       for g in _DTYPES for c in (None, "fp32", "bf16", "fp16")},
    "segments update grad=fp32 compute=None no-noise": _segment_update("fp32", None, False),
    "segments update grad=bf16 fp32-split noise": _segment_update("bf16", None, True, split=True),
    "segments update grad=bf16 fp32-split no-noise": _segment_update("bf16", None, False, split=True),
    "segments reduce misaligned": _segment_reduce("fp32", True, mod=1),
    "segments update misaligned": _segment_update("fp32", None, True, mod=1),
    # pSMILE (rtllm.samplers.smile_precond): no noise, the drift scaled by the preconditioner
    "update grad=bf16 compute=bf16 no-noise precond": _update("bf16", "bf16", False, precond=True),
    "update grad=bf16 fp32-split no-noise precond": _update("bf16", None, False, split=True, precond=True),
    "segments update grad=bf16 compute=bf16 no-noise precond": _segment_update("bf16", "bf16", False, precond=True),
    "segments update misaligned precond": _segment_update("fp32", None, False, mod=1, precond=True),
}
