"""pSMILE's diagonal preconditioner: an EMA of the gradient's mean and variance per parameter.

The rule, read from the SMILE authors' public code (github.com/EmanuelSommer/SMILE,
src/kernels/smile.py, class NOISYSMILE), with their one bug fixed:

- after every full step, with G the full (data-set-scaled) log-density gradient at the step's
  end (NaN -> 0, clipped to +-1e6, as the authors clip theirs), elementwise: m <- (1 - b) m + b G, then s^2 <- max((1 - b) s^2 + b (G - m)^2, 1e-7),
  b = 0.01 (an EMA decay of 0.99); m starts at 0, s at 1. The authors' code rebuilds its state
  without the running mean, so m is reset to ones before every update (m = 0.99 + 0.01 G each
  step): a bug. This is the intended EMA.
- the preconditioner of the next step: s_c = clip(s, lo, hi), normalized to unit mean square
  over all D parameters: s_n = s_c / sqrt(mean(s_c^2)). The authors clip to the absolute range
  [1e-2, 1e4] (clip="absolute" here). The default, clip="relative", clips to [0.1, 100] x rms(s),
  rms(s) = sqrt(mean(s^2)): scale-free. With a likelihood scale S ~ 1e7 (an LM at S = D / 0.1)
  the absolute range puts ~92% of s at its ceiling (no adaptation) and leaves the ~5% of
  coordinates without gradient (unused positions, absent tokens' embeddings) at s ~ 1, p ~ 1e4 x
  the median: they drift freely and the BMA's held-out NLL diverges (docs/smile.md).
- the step runs MCLMC in the coordinates y = s_n x: the velocity u (|u| = 1) lives there, the
  kicks use the gradient g / s_n (which is also what the energy ledger sees), the drifts move x
  by eps c u / s_n.

Here p = 1 / s_n is stored per element and the update pass drifts by delta * (u * p) (the one
extra buffer the fused update kernel takes, `Shard.precond`); the gradient buffer is scaled by p
in place before the reduce pass, so the reduce kernel and the scalar rules are MCLMC's unchanged.
Memory: m, s^2 and p, fp32: 12 bytes per parameter (p could be derived from s^2 in the kernel;
it is stored to keep the kernel change to one multiply).

Timing: at a step boundary p is refreshed from the statistics so far, then the boundary's
gradient enters them. Here the boundary gradient is already on the new step's minibatch (both
gradients of a step share one), so p never depends on the minibatch of the step it serves, as
in the authors' code (statistics from the previous step's end gradient, on its minibatch). The
closing kick of the finished step shares the boundary's update with the opening kick of the new
one, so it uses the new p too (one gradient, one scaling).
"""
from __future__ import annotations

import math

import torch

EMA = 0.01  # b: the weight of a new gradient (decay 0.99)
CLIP = (1e-2, 1e4)  # clip="absolute": the authors' range for s itself
RELATIVE_CLIP = (1e-1, 1e2)  # clip="relative" (default): the range for s / rms(s)
CLIPS = ("relative", "absolute")
VAR_FLOOR = 1e-7
MAX_GRAD = 1e6  # the authors' gradient clip, applied to what enters the statistics
_SLICE = 1 << 22  # elements per slice of the elementwise passes (bounded temporaries)


class DiagonalPreconditioner:
    """The EMA statistics and p = 1 / s_n per shard; `shard.precond` is set to p."""

    def __init__(self, shards: list, clip: str = "relative") -> None:
        if clip not in CLIPS:
            raise ValueError(f"preconditioner clip must be one of {CLIPS}, got {clip!r}")
        self.shards = shards
        self.clip = clip
        self.mean = [torch.zeros(s.numel, dtype=torch.float32, device=s.v.device) for s in shards]
        self.var = [torch.ones(s.numel, dtype=torch.float32, device=s.v.device) for s in shards]
        self.p = [torch.ones(s.numel, dtype=torch.float32, device=s.v.device) for s in shards]
        self.num_params = sum(s.numel for s in shards)
        self.updates = 0
        self.frozen = False  # True: p and the statistics stay as they are (observe/refresh do nothing)
        for shard, p in zip(shards, self.p):
            shard.precond = p

    @staticmethod
    def bytes_per_param() -> int:
        return 12  # mean, variance and p, fp32

    @torch.no_grad()
    def observe(self, scale: float) -> None:
        """Fold in the gradient in the shards' buffers (G = scale * g: g is the loss gradient,
        the prior's term already added as a fraction of `scale`)."""
        if self.frozen:
            return
        for shard, m, var in zip(self.shards, self.mean, self.var):
            for start in range(0, shard.numel, _SLICE):
                sl = slice(start, start + _SLICE)
                # as the authors clip their gradients: a non-finite or huge one (a divergence,
                # which the step then undoes) must not poison the statistics for good
                grad = shard.g[sl].to(torch.float32, copy=True).mul_(scale).nan_to_num_(0.0, MAX_GRAD, -MAX_GRAD)
                grad.clamp_(-MAX_GRAD, MAX_GRAD)
                m[sl].mul_(1 - EMA).add_(grad, alpha=EMA)
                dev = grad.sub_(m[sl]).square_()
                var[sl].mul_(1 - EMA).add_(dev, alpha=EMA).clamp_(min=VAR_FLOOR)
        self.updates += 1

    @torch.no_grad()
    def bounds(self) -> tuple[float, float]:
        """The clip range of s: the authors' absolute CLIP, or (default) RELATIVE_CLIP times
        rms(s) = sqrt(mean(s^2)) over all parameters (one sum; no sort)."""
        if self.clip == "absolute":
            return CLIP
        total = sum(float(torch.sum(var, dtype=torch.float64)) for var in self.var)
        rms = math.sqrt(total / self.num_params)
        return RELATIVE_CLIP[0] * rms, RELATIVE_CLIP[1] * rms

    @torch.no_grad()
    def refresh(self) -> None:
        """p <- sqrt(mean(s_c^2)) / s_c from the current statistics (a sum over all parameters)."""
        if self.frozen:
            return
        lo, hi = self.bounds()
        total = 0.0
        for var, p in zip(self.var, self.p):
            for start in range(0, var.numel(), _SLICE):
                sl = slice(start, start + _SLICE)
                s = var[sl].sqrt().clamp_(lo, hi)
                total += float(torch.sum(s.square(), dtype=torch.float64))
                p[sl].copy_(s)  # s_c for now; inverted and normalized below
        norm = math.sqrt(total / self.num_params)
        for p in self.p:
            p.reciprocal_().mul_(norm)

    @torch.no_grad()
    def scale_gradients(self) -> None:
        """g <- g * p in place: the gradient in the preconditioned coordinates."""
        for shard, p in zip(self.shards, self.p):
            shard.g.mul_(p)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "p": self.p, "updates": self.updates,
                "frozen": self.frozen, "clip": self.clip}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        clip = state.get("clip", "absolute")  # states saved before the option: the authors' clip
        if clip != self.clip:
            raise ValueError(f"preconditioner state was saved with clip={clip!r}, this sampler has "
                             f"clip={self.clip!r}: build it with precondition_clip={clip!r}")
        for key in ("mean", "var", "p"):
            theirs = [t.numel() for t in state[key]]
            if theirs != [t.numel() for t in getattr(self, key)]:
                raise ValueError(f"preconditioner state has shard sizes {theirs}, this sampler "
                                 f"{[t.numel() for t in getattr(self, key)]}")
            for dst, src in zip(getattr(self, key), state[key]):
                dst.copy_(src)
        self.updates = int(state["updates"])
        self.frozen = bool(state["frozen"])
