"""Many shards, few launches: the Triton passes over every shard of a step in one launch per kind.

Shards are grouped by what the compiled kernel specializes on (gradient and compute dtypes,
layout, offset % 4, noise on/off, device); each group is one segment launch
(rtllm.kernels.triton_segments). So the launches per pass do not grow with the number of rays
(one ray per tensor: 580 shards at GPT-2 XL, ~2,300 launches a step before). The tables are
built once per set of shards and kept while the shards' buffers stay where they are.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import Tensor

from rtllm.state.flat import Shard

_MAX_TABLES = 8  # distinct shard lists whose tables are kept (a sampler uses one or two)


def _kind(shard: Shard) -> tuple:
    return (shard.v.device, shard.g.dtype, None if shard.compute is None else shard.compute.dtype,
            shard.x_lo is not None, shard.offset % 4, shard.precond is not None)


def _identity(shards: list[Shard]) -> tuple:
    """What a cached table depends on: which buffers, where, how long, at which offsets."""
    return tuple((s.x.data_ptr(), s.v.data_ptr(), s.g.data_ptr(), s.numel, s.offset,
                  None if s.compute is None else s.compute.data_ptr(),
                  None if s.x_lo is None else s.x_lo.data_ptr(),
                  None if s.precond is None else s.precond.data_ptr()) for s in shards)


class SegmentLauncher:
    """Groups shards into kinds and launches each kind once per pass."""

    def __init__(self) -> None:
        self._tables: dict[tuple, list[tuple[list[int], object]]] = {}
        self.launches = 0  # kernel launches made, for tests and benchmarks

    def _groups(self, shards: list[Shard]) -> list[tuple[list[int], object]]:
        """[(indices into shards, Segments)] per kind, cached by the shards' identity."""
        from rtllm.kernels.triton_segments import build_segments

        key = _identity(shards)
        groups = self._tables.get(key)
        if groups is None:
            by_kind: dict[tuple, list[int]] = defaultdict(list)
            for i, shard in enumerate(shards):
                if shard.numel:
                    by_kind[_kind(shard)].append(i)
            groups = [(idx, build_segments([shards[i] for i in idx], [shards[i].offset for i in idx]))
                      for idx in by_kind.values()]
            if len(self._tables) >= _MAX_TABLES:
                self._tables.clear()
            self._tables[key] = groups
        return groups

    def reduce(self, shards: list[Shard], *, seed: int, step: int, stream: int, noise: bool) -> Tensor:
        """float64 [len(shards), 6] on the shards' device (empty shards: zeros)."""
        from rtllm.kernels.triton_segments import reduce_segments

        device = shards[0].v.device if shards else torch.device("cpu")
        out = torch.zeros((len(shards), 6), dtype=torch.float64, device=device)
        for idx, seg in self._groups(shards):
            with on_device(seg.v[0]):
                sums = reduce_segments(seg, seed=seed, step=step, stream=stream, noise=noise)
            self.launches += 1
            out[torch.tensor(idx, device=device)] = sums.to(device)
        return out

    def update(self, shards: list[Shard], alpha: list[float], beta: list[float], gamma: list[float],
               delta: float, *, seed: int, step: int, stream: int, noise: bool) -> None:
        from rtllm.kernels.triton_segments import update_segments

        for idx, seg in self._groups(shards):
            # Noise only where gamma != 0 (as the per-shard launch): split the kind in two.
            for noisy in (True, False):
                part = [j for j, i in enumerate(idx) if (noise and gamma[i] != 0.0) == noisy]
                if not part:
                    continue
                sub = seg if len(part) == len(idx) else self._subset(seg, part)
                coef = torch.tensor([[alpha[idx[j]], beta[idx[j]], gamma[idx[j]]] for j in part],
                                    dtype=torch.float32).to(seg.v[0].device)
                with on_device(seg.v[0]):
                    update_segments(sub, coef, delta=delta, seed=seed, step=step, stream=stream,
                                    noise=noisy)
                self.launches += 1

    def _subset(self, seg, part: list[int]):
        from rtllm.kernels.triton_segments import build_segments

        shards = [_ShardView(seg, j) for j in part]
        return build_segments(shards, [int(seg.table[j, 6]) * 4 + seg.offset_mod for j in part])


class _ShardView:
    """The buffers of segment j of a Segments, shaped like a Shard for build_segments."""

    def __init__(self, seg, j: int) -> None:
        self.x, self.v, self.g = seg.x[j], seg.v[j], seg.g[j]
        self.x_lo = None if seg.x_lo is None else seg.x_lo[j]
        self.compute = None if seg.compute is None else seg.compute[j]
        self.precond = None if seg.precond is None else seg.precond[j]


def on_device(t: Tensor):
    """Launch on t's GPU: Triton launches on the *current* device and its current stream, which
    under torchrun (rank k on cuda:k) or --device cuda:1 need not be where the tensors live."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
