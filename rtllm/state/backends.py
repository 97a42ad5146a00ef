"""The two passes of a sampler step over one shard, on three interchangeable backends.

- `triton`: the fused kernels (CUDA; on CPU only under TRITON_INTERPRET=1, for tests).
  Noise is counter-based Philox, regenerated in the update pass instead of stored.
- `reference`: the plain-torch references of those kernels, same Philox stream: slow, exact;
  the oracle the Triton kernels are tested against.
- `torch`: the fast CPU path. Noise comes from torch's generator, seeded per fixed-size chunk
  from (seed, step, stream, chunk), so it is still a pure function of the global element index
  (not of sharding or threads); it is drawn once in the reduce pass and kept for the update pass
  while the cache has room (NOISE_CACHE_MAX elements over all shards), else drawn again.
"""
from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from rtllm.state.flat import Shard
from rtllm.state.segment_launch import SegmentLauncher, on_device
from rtllm.kernels.reference import join_fp32, split_fp32

# torch backend: elements per noise chunk and per work item. Small enough to stay in cache and
# to keep torch.dot's serial fp32 accumulation short (~1e-6 relative error per partial sum).
CHUNK = 2**16
PIECES_PER_TASK = 4  # torch backend: chunks per thread-pool task in the reduce pass
UPDATE_SLICE = 2**22  # torch backend: elements per slice of the update pass
# torch backend: keep up to 1 GiB of fp32 noise between passes, over all shards together. A cap
# per shard would not bound it: a model split into many small shards (one ray per block) would
# cache a full-size copy of the noise (6 GB at GPT-2 1.5B). Shards beyond it redraw the noise.
NOISE_CACHE_MAX = 2**28
_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def chunk_seed(seed: int, step: int, stream: int, chunk: int) -> int:
    h = 0
    for part in (seed, step, stream, chunk):
        h = _splitmix64(h ^ (part & _MASK64))
    return h


class TorchBackend:
    """Fast CPU path: cache-sized chunks, noise from torch's generator, reduce on all cores."""

    name = "torch"

    def __init__(self) -> None:
        self._noise: dict[int, tuple[tuple, Tensor]] = {}
        self._noise_elements = 0  # elements held in self._noise
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None

    # -- noise --------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        gen = getattr(self._local, "gen", None)
        if gen is None:
            gen = self._local.gen = torch.Generator()
        return gen

    def _pieces(self, shard: Shard, lo: int = 0, hi: int | None = None):
        """(local start, length, chunk index, start within chunk) covering shard[lo:hi]."""
        end = shard.offset + (shard.numel if hi is None else min(hi, shard.numel))
        pos = shard.offset + lo
        while pos < end:
            chunk = pos // CHUNK
            stop = min(end, (chunk + 1) * CHUNK)
            yield pos - shard.offset, stop - pos, chunk, pos - chunk * CHUNK
            pos = stop

    def _draw(self, out: Tensor, shard: Shard, chunk: int, within: int, key: tuple) -> None:
        """Fill `out` with the noise of global elements chunk*CHUNK + within + [0, len(out))."""
        seed, step, stream = key
        gen = self._generator()
        gen.manual_seed(chunk_seed(seed, step, stream, chunk))
        # The chunk's length depends only on the total size, so its draw is sharding-invariant.
        full = min(CHUNK, shard.total_numel - chunk * CHUNK)
        if within == 0 and out.numel() == full:
            out.normal_(generator=gen)
        else:
            buf = torch.empty(full, dtype=out.dtype, device=out.device).normal_(generator=gen)
            out.copy_(buf[within : within + out.numel()])

    def _noise_buffer(self, shard: Shard, key: tuple) -> tuple[Tensor | None, bool]:
        """The shard's noise cache (None when the cache is full) and whether it holds `key`'s noise."""
        held = self._noise.get(id(shard))
        if held is not None and held[1].numel() != shard.numel:  # an id reused by a new shard
            del self._noise[id(shard)]
            self._noise_elements -= held[1].numel()
            held = None
        if held is None:
            if self._noise_elements + shard.numel > NOISE_CACHE_MAX:
                return None, False
            self._noise_elements += shard.numel
            held = ((), torch.empty(shard.numel, dtype=torch.float32, device=shard.x.device))
        self._noise[id(shard)] = (key, held[1])
        return held[1], held[0] == key

    def _pool_map(self, fn, items: list):
        if len(items) < 2 or torch.get_num_threads() < 2:
            return [fn(it) for it in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="rtllm")
        return list(self._pool.map(fn, items))

    # -- passes -------------------------------------------------------------------------
    def reduce(self, shard: Shard, *, seed: int, step: int, stream: int, noise: bool) -> Tensor:
        key = (seed, step, stream)
        cache, _ = self._noise_buffer(shard, key) if noise else (None, False)

        def partial_sums(piece) -> Tensor:
            start, n, chunk, within = piece
            v = shard.v[start : start + n]
            g = shard.g[start : start + n].float()
            vv, gg, vg = torch.dot(v, v), torch.dot(g, g), torch.dot(v, g)
            if not noise:
                zero = torch.zeros((), dtype=v.dtype)
                return torch.stack([vv, gg, vg, zero, zero, zero])
            nz = cache[start : start + n] if cache is not None else torch.empty_like(v)
            self._draw(nz, shard, chunk, within, key)
            return torch.stack([vv, gg, vg, torch.dot(nz, nz), torch.dot(nz, v), torch.dot(nz, g)])

        pieces = list(self._pieces(shard))
        if not pieces:
            return torch.zeros(6, dtype=torch.float64)
        # A few pieces per task keep the thread pool's overhead small next to the work.
        items = [pieces[i : i + PIECES_PER_TASK] for i in range(0, len(pieces), PIECES_PER_TASK)]
        partials = self._pool_map(lambda item: torch.stack([partial_sums(p) for p in item]), items)
        # Per-chunk fp32 partials, summed in float64 in a fixed order: deterministic.
        return torch.cat(partials).sum(0, dtype=torch.float64)

    def update(self, shard: Shard, alpha: float, beta: float, gamma: float, delta: float, *,
               seed: int, step: int, stream: int, noise: bool) -> None:
        key = (seed, step, stream)
        noise = noise and gamma != 0.0
        cache, fresh = self._noise_buffer(shard, key) if noise else (None, False)
        if noise and not fresh:  # no cache, or a step without a reduce pass: draw the noise again
            # Drawn chunk by chunk into a slice-sized buffer, applied per slice: elementwise ops
            # on 2^16-element chunks cost ~20x more on a loaded machine (a thread-pool barrier
            # per op), and there are 24k chunks per pass at 1.5e9 parameters.
            scratch = None if cache is not None else \
                torch.empty(min(UPDATE_SLICE, shard.numel), dtype=torch.float32, device=shard.x.device)
            for start in range(0, shard.numel, UPDATE_SLICE):
                stop = min(start + UPDATE_SLICE, shard.numel)
                nz = cache[start:stop] if cache is not None else scratch[: stop - start]
                for pos, n, chunk, within in self._pieces(shard, start, stop):
                    self._draw(nz[pos - start : pos - start + n], shard, chunk, within, key)
                self._update_slice(shard, slice(start, stop), nz, alpha, beta, gamma, delta)
            return
        # Elementwise and memory-bound: large slices, torch's own threads.
        for start in range(0, shard.numel, UPDATE_SLICE):
            sl = slice(start, start + UPDATE_SLICE)
            self._update_slice(shard, sl, cache[sl] if noise else None, alpha, beta, gamma, delta)

    @staticmethod
    def _update_slice(shard: Shard, sl: slice, nz: Tensor | None, alpha: float, beta: float,
                      gamma: float, delta: float) -> None:
        v = shard.v[sl]
        v.mul_(alpha).add_(shard.g[sl], alpha=beta)
        if nz is not None:
            v.add_(nz, alpha=gamma)
        step = v if shard.precond is None else v * shard.precond[sl]  # pSMILE: drift by v * p
        if delta != 0.0 and shard.x_lo is not None:  # fp32-split: the same fp32 add, re-split
            _split_add_(shard.x[sl], shard.x_lo[sl], step, delta)
        elif delta != 0.0:
            shard.x[sl].add_(step, alpha=delta)
            if shard.compute is not None:
                shard.compute[sl].copy_(shard.x[sl])

    def reduce_shards(self, shards: list[Shard], **key) -> Tensor:
        """float64 [len(shards), 6]: the reduce pass of every shard (one after another here)."""
        return torch.stack([self.reduce(shard, **key) for shard in shards]) if shards else \
            torch.zeros((0, 6), dtype=torch.float64)

    def update_shards(self, shards: list[Shard], alpha: list[float], beta: list[float],
                      gamma: list[float], delta: float, **key) -> None:
        """The update pass of every shard i with coefficients (alpha[i], beta[i], gamma[i])."""
        for shard, a, b, c in zip(shards, alpha, beta, gamma):
            self.update(shard, a, b, c, delta, **key)

    def draw_velocity(self, shard: Shard, *, seed: int, stream: int, scale: float) -> None:
        for start, n, chunk, within in self._pieces(shard):
            self._draw(shard.v[start : start + n], shard, chunk, within, (seed, 0, stream))
        if scale != 1.0:  # in large slices, for the reason given in update()
            for start in range(0, shard.numel, UPDATE_SLICE):
                shard.v[start : start + UPDATE_SLICE].mul_(scale)


def _split_add_(hi: Tensor, lo: Tensor, v: Tensor, delta: float) -> None:
    """(hi, lo) <- split_fp32(join_fp32(hi, lo) + delta * v), bit for bit, in 7 passes.

    On a little-endian machine an int32 is its low int16 then its high int16, so interleaving
    the planes builds the fp32 bits in one copy, and the halves of the rounded result are
    strided views: ~4x faster on CPU than composing the reference's join and split. With
    lo = r - 2^15 (r the unsigned low half), r = lo ^ 0x8000 and lo = r' ^ 0x8000 in int16.
    """
    if sys.byteorder != "little":
        hi_new, lo_new = split_fp32(join_fp32(hi, lo).add_(v, alpha=delta))
        hi.copy_(hi_new)
        lo.copy_(lo_new)
        return
    bits = torch.stack([torch.bitwise_xor(lo, -32768), hi.view(torch.int16)], dim=-1)
    bits = bits.view(torch.int32).view(-1)
    bits.sub_(0x8000)  # now the fp32 position's bits
    bits.view(torch.float32).add_(v, alpha=delta)
    bits.add_(0x8000)  # the high half rounded to nearest, ties away from zero
    halves = bits.view(torch.int16).view(-1, 2)
    hi.view(torch.int16).copy_(halves[:, 1])
    torch.bitwise_xor(halves[:, 0], -32768, out=lo)


class _PhiloxBackend:
    """Backends whose noise is the counter-based Philox stream, regenerated in each pass."""

    name = ""

    def __init__(self, reduce_fn, update_fn) -> None:
        self._reduce, self._update = reduce_fn, update_fn

    def reduce(self, shard: Shard, *, seed: int, step: int, stream: int, noise: bool) -> Tensor:
        with on_device(shard.v):
            return self._reduce(shard.v, shard.g, seed=seed, step=step, stream=stream,
                                offset=shard.offset, noise=noise)

    def update(self, shard: Shard, alpha: float, beta: float, gamma: float, delta: float, *,
               seed: int, step: int, stream: int, noise: bool) -> None:
        with on_device(shard.v):
            self._update(shard.x, shard.v, shard.g, shard.compute, x_lo=shard.x_lo, alpha=alpha,
                         beta=beta, gamma=gamma, delta=delta, seed=seed, step=step, stream=stream,
                         offset=shard.offset, noise=noise and gamma != 0.0, precond=shard.precond)

    def reduce_shards(self, shards: list[Shard], **key) -> Tensor:
        return TorchBackend.reduce_shards(self, shards, **key)

    def update_shards(self, shards: list[Shard], alpha: list[float], beta: list[float],
                      gamma: list[float], delta: float, **key) -> None:
        TorchBackend.update_shards(self, shards, alpha, beta, gamma, delta, **key)

    def draw_velocity(self, shard: Shard, *, seed: int, stream: int, scale: float) -> None:
        # v <- scale * n through the update pass (alpha = beta = delta = 0 leaves x as it is).
        shard.v.zero_()
        with on_device(shard.v):
            self._update(shard.x, shard.v, shard.v, None, x_lo=shard.x_lo, alpha=0.0, beta=0.0,
                         gamma=scale, delta=0.0, seed=seed, step=0, stream=stream,
                         offset=shard.offset, noise=True)


class _TritonBackend(_PhiloxBackend):
    """The fused kernels; a pass over many shards is one launch per kind of shard (segment_launch)."""

    def __init__(self, reduce_fn, update_fn) -> None:
        super().__init__(reduce_fn, update_fn)
        self.segments = SegmentLauncher()

    def reduce_shards(self, shards: list[Shard], **key) -> Tensor:
        return self.segments.reduce(shards, **key)

    def update_shards(self, shards: list[Shard], alpha: list[float], beta: list[float],
                      gamma: list[float], delta: float, **key) -> None:
        self.segments.update(shards, alpha, beta, gamma, delta, **key)


def triton_available() -> bool:
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def make_backend(name: str, device: torch.device):
    """`auto` picks Triton on CUDA and the torch path on CPU."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "torch":
        return TorchBackend()
    if name == "reference":
        from rtllm.kernels.reference import fused_update_ref_, reduce_sums_ref

        backend = _PhiloxBackend(reduce_sums_ref, fused_update_ref_)
    elif name == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            # Triton picks compile vs interpret when it is imported: compiled kernels take
            # CUDA tensors only. Say so now rather than at the first launch.
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                             "triton is imported; use backend='reference' (the same noise) or "
                             "move the model to the GPU")
        if not triton_available():
            raise ValueError("backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 "
                             "for CPU tests); use backend='torch' or 'auto'")
        from rtllm.kernels.triton_step import fused_update_, reduce_sums

        backend = _TritonBackend(reduce_sums, fused_update_)
    else:
        raise ValueError(f"backend must be 'auto', 'torch', 'triton' or 'reference', got {name!r}")
    backend.name = name
    return backend
