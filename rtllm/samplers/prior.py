"""Isotropic Gaussian prior on the sampled weights, N(center, sigma^2 I).

The target is ln p(x) = -S * loss(x) + ln prior(x); the prior is *not* scaled by S. The samplers
consume the gradient of ln p / (-S), so the prior adds (x - center) / (sigma^2 * S) to the loss
gradient. center 'zero' costs no memory; 'start' keeps a copy of the starting weights in the
compute dtype (+2 bytes/parameter in bf16). The term is added by a torch pass over the gradient
buffer before the reduce pass (not yet fused into the kernels).
"""
from __future__ import annotations

import torch

from rtllm.state.flat import Shard

_CHUNK = 2**22  # elements per pass: bounded temporaries


class GaussianPrior:
    def __init__(self, shards: list[Shard], *, scale: float, center: str = "zero") -> None:
        if not scale > 0 or scale != scale or scale == float("inf"):
            raise ValueError(f"prior_scale must be a finite number > 0, got {scale!r}")
        if center not in ("zero", "start"):
            raise ValueError(f"prior_center must be 'zero' or 'start', got {center!r}")
        self.scale = float(scale)
        self.center = center
        # The compute copy's dtype (bf16 on GPU) halves the memory of the saved start.
        self._centers = [None if center == "zero" else
                         (s.compute if s.compute is not None else s.x).clone() for s in shards]

    def _diffs(self, shards: list[Shard]):
        """(shard, slice, x - center) in chunks, so no full-size temporary is created."""
        for shard, center in zip(shards, self._centers):
            for start in range(0, shard.numel, _CHUNK):
                sl = slice(start, start + _CHUNK)
                x = shard.position(sl)  # fp32 in every layout (rtllm.state.flat)
                yield shard, sl, (x if center is None else x - center[sl].float())

    def add_gradient_(self, shards: list[Shard], scale_likelihood: float) -> None:
        """g += (x - center) / (sigma^2 * S)."""
        coef = 1.0 / (self.scale**2 * scale_likelihood)
        for shard, sl, diff in self._diffs(shards):
            shard.g[sl].add_(diff.to(shard.g.dtype), alpha=coef)

    def neg_log_density(self, shards: list[Shard]) -> float:
        """|x - center|^2 / (2 sigma^2) (up to a constant), accumulated in float64: the prior's
        part of the potential energy MCLMC tracks."""
        total = None  # accumulated on the device: one host sync per call, not one per chunk
        for _, _, diff in self._diffs(shards):
            part = torch.sum(diff * diff, dtype=torch.float64)
            total = part if total is None else total.add_(part)
        return (0.0 if total is None else float(total)) / (2 * self.scale**2)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "center": self.center, "centers": self._centers}

    def load_state_dict(self, state: dict) -> None:
        if state["center"] != self.center:
            raise ValueError(f"checkpoint prior center {state['center']!r} != {self.center!r}")
        self.scale = state["scale"]
        for mine, theirs in zip(self._centers, state["centers"]):
            if mine is not None:
                mine.copy_(theirs)
