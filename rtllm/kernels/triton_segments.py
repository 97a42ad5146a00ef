"""The two passes of triton_step over many shards at once: one launch per pass per kind of shard.

With one ray per tensor a model has hundreds of shards (580 at GPT-2 XL) and a launch per shard
and pass makes the step host-bound (~28 us a launch). Here a launch covers every shard of one
*kind* (gradient dtype, compute dtype, layout, offset % 4, noise on/off): a segment table tells
each program which shard (segment) and which block of it it works on, and where the shard's
buffers lie, as element offsets from one base tensor per buffer role (so the dtypes and the
pointer alignment stay specializations the compiler sees). The math and the noise are those of
triton_step (`_normals_block`): results equal the per-shard launches.

The reduce pass writes fp32 partials per program; each shard's partials are summed in float64
(torch.segment_reduce, a fixed order): the per-shard sums the sampler adds up per ray.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_step import BLOCK, _NUM_WARPS, _check_device, _normals_block, _store_sums, _update_block

__all__ = ["Segments", "build_segments", "reduce_segments", "update_segments"]

# Table columns (int64): where each shard's buffers start, in elements from the role's base
# tensor; its length; its first Philox quad (offset // 4). The _LO column holds the drift
# preconditioner's start instead when there is one (pSMILE: fp32 layout, no low plane): a ninth
# column made sm_80 spill in the fp32-compute update with noise.
_X, _LO, _V, _G, _C, _N, _QUAD, _COLUMNS = range(8)
_ALIGN_BYTES = 16  # one ld/st.global.v4.b32


@triton.jit
def _segment(table_ptr, block_seg_ptr, block_idx_ptr, COLUMNS: tl.constexpr):
    """This program's segment row, its block number within the segment, length, first quad."""
    pid = tl.program_id(0)
    seg = tl.load(block_seg_ptr + pid).to(tl.int64)
    blk = tl.load(block_idx_ptr + pid).to(tl.int64)
    row = table_ptr + seg * COLUMNS
    return row, blk, tl.load(row + 5), tl.load(row + 6)


@triton.jit
def _start(row, column: tl.constexpr, ALIGN: tl.constexpr):
    """Element offset of a buffer from its base; a known multiple of ALIGN when aligned."""
    start = tl.load(row + column)
    if ALIGN > 1:
        start = tl.multiple_of(start, ALIGN)
    return start


@triton.jit
def _full_block(blk, N, OFFSET_MOD: tl.constexpr, BLOCK: tl.constexpr):
    """Whether the block can skip the mask: all its elements lie in the segment, and its accesses
    are aligned (OFFSET_MOD == 0; misaligned kinds get scalar accesses anyway, so they keep one
    masked path: less code, fewer registers)."""
    if OFFSET_MOD == 0:
        return blk * BLOCK + BLOCK <= N
    else:
        return False


@triton.jit(do_not_specialize=["seed", "step", "stream"])
def _reduce_segments_kernel(
    v_base, g_base, table_ptr, block_seg_ptr, block_idx_ptr, part_ptr, seed, step, stream,
    OFFSET_MOD: tl.constexpr, NOISE: tl.constexpr, ALIGN_V: tl.constexpr, ALIGN_G: tl.constexpr,
    BLOCK: tl.constexpr, COLUMNS: tl.constexpr,
):
    row, blk, N, quad_base = _segment(table_ptr, block_seg_ptr, block_idx_ptr, COLUMNS)
    v_ptr = v_base + _start(row, 2, ALIGN_V)
    g_ptr = g_base + _start(row, 3, ALIGN_G)
    idx = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64) - OFFSET_MOD
    mask = (idx >= 0) & (idx < N)
    if _full_block(blk, N, OFFSET_MOD, BLOCK):
        v = tl.load(v_ptr + idx).to(tl.float32)
        g = tl.load(g_ptr + idx).to(tl.float32)
    else:
        v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    _store_sums(part_ptr, v, g, mask, seed, step, stream, quad_base + blk * (BLOCK // 4), NOISE, BLOCK)


@triton.jit(do_not_specialize=["delta", "seed", "step", "stream"])
def _update_segments_kernel(
    x_base, lo_base, v_base, g_base, c_base, p_base, table_ptr, block_seg_ptr, block_idx_ptr, coef_ptr,
    delta, seed, step, stream,
    OFFSET_MOD: tl.constexpr, NOISE: tl.constexpr, HAS_COMPUTE: tl.constexpr, SPLIT: tl.constexpr,
    ALIGN_X: tl.constexpr, ALIGN_V: tl.constexpr, ALIGN_G: tl.constexpr, ALIGN_C: tl.constexpr,
    BLOCK: tl.constexpr, COLUMNS: tl.constexpr, PRECOND: tl.constexpr, ALIGN_P: tl.constexpr,
):
    row, blk, N, quad_base = _segment(table_ptr, block_seg_ptr, block_idx_ptr, COLUMNS)
    if PRECOND:  # its start is in the _LO column (no split position with a preconditioner)
        p_ptr = p_base + _start(row, 1, ALIGN_P)
    else:
        p_ptr = p_base
    seg = tl.load(block_seg_ptr + tl.program_id(0)).to(tl.int64)
    x_ptr = x_base + _start(row, 0, ALIGN_X)
    lo_ptr = lo_base + _start(row, 1, ALIGN_X)
    v_ptr = v_base + _start(row, 2, ALIGN_V)
    g_ptr = g_base + _start(row, 3, ALIGN_G)
    c_ptr = c_base + _start(row, 4, ALIGN_C)
    idx = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64) - OFFSET_MOD
    mask = (idx >= 0) & (idx < N)
    # The noise once, outside the two paths (only the memory access differs between them).
    if NOISE:
        noise = _normals_block(seed, step, stream, quad_base + blk * (BLOCK // 4), BLOCK // 4)
    else:
        noise = tl.zeros([BLOCK], dtype=tl.float32)
    coef = coef_ptr + seg * 3
    alpha, beta, gamma = tl.load(coef + 0), tl.load(coef + 1), tl.load(coef + 2)
    if _full_block(blk, N, OFFSET_MOD, BLOCK):
        _update_block(x_ptr, lo_ptr, v_ptr, g_ptr, c_ptr, idx, mask, alpha, beta, gamma, delta,
                      noise, NOISE, HAS_COMPUTE, SPLIT, False, p_ptr, PRECOND)
    else:
        _update_block(x_ptr, lo_ptr, v_ptr, g_ptr, c_ptr, idx, mask, alpha, beta, gamma, delta,
                      noise, NOISE, HAS_COMPUTE, SPLIT, True, p_ptr, PRECOND)


@dataclass(frozen=True)
class Segments:
    """Shards of one kind, ready to launch over: the segment table and the per-program map."""

    x: list[torch.Tensor]  # per segment; the first of each role is that role's base
    x_lo: list[torch.Tensor] | None
    v: list[torch.Tensor]
    g: list[torch.Tensor]
    compute: list[torch.Tensor] | None
    precond: list[torch.Tensor] | None  # pSMILE's drift preconditioner per segment
    table: torch.Tensor  # int64 [segments, _COLUMNS]
    block_seg: torch.Tensor  # int32 [programs]: segment of each program
    block_idx: torch.Tensor  # int32 [programs]: block number within that segment
    blocks: torch.Tensor  # int64 [segments]: programs per segment (for the float64 sums)
    offset_mod: int
    aligns: dict  # role -> ALIGN (elements of 16 bytes, or 1 when some segment is not aligned)


def _start_of(t: torch.Tensor, base: torch.Tensor) -> int:
    delta = t.data_ptr() - base.data_ptr()
    if delta % t.element_size():
        raise ValueError("a shard buffer is not element-aligned with the first shard's buffer; "
                         "segment launches need allocations aligned to their element size")
    return delta // t.element_size()


def _align(tensors: list[torch.Tensor], offset_mod: int) -> int:
    """Elements per 16 bytes when every buffer starts 16-byte aligned (and the shards' blocks
    are aligned: offset % 4 == 0), else 1: what the compiler may assume about the starts."""
    size = tensors[0].element_size()
    ok = offset_mod == 0 and all(t.data_ptr() % _ALIGN_BYTES == 0 for t in tensors)
    return _ALIGN_BYTES // size if ok else 1


def build_segments(shards: list, offsets: list[int]) -> Segments:
    """The table of shards of one kind (same dtypes and layout, same offset % 4)."""
    mods = {o % 4 for o in offsets}
    if len(mods) != 1:
        raise ValueError("one segment launch needs shards with the same offset % 4")
    mod = mods.pop()
    xs = [s.x for s in shards]
    los = [s.x_lo for s in shards] if shards[0].x_lo is not None else None
    vs, gs = [s.v for s in shards], [s.g for s in shards]
    cs = [s.compute for s in shards] if shards[0].compute is not None else None
    ps = [s.precond for s in shards] if getattr(shards[0], "precond", None) is not None else None
    if ps is not None and los is not None:
        raise ValueError("a drift preconditioner (pSMILE) needs the fp32 layout: its start takes the "
                         "low plane's column of the segment table")
    rows, seg_of_block, idx_in_seg, blocks = [], [], [], []
    for i, (s, off) in enumerate(zip(shards, offsets)):
        n = s.v.numel()
        lo_or_p = _start_of(s.x_lo, los[0]) if los else _start_of(s.precond, ps[0]) if ps else 0
        rows.append([_start_of(s.x, xs[0]), lo_or_p, _start_of(s.v, vs[0]), _start_of(s.g, gs[0]),
                     _start_of(s.compute, cs[0]) if cs else 0, n, off // 4])
        count = triton.cdiv(n + mod, BLOCK)
        seg_of_block += [i] * count
        idx_in_seg += range(count)
        blocks.append(count)
    device = vs[0].device
    as_tensor = lambda data, dtype: torch.tensor(data, dtype=dtype).to(device)  # noqa: E731
    return Segments(
        x=xs, x_lo=los, v=vs, g=gs, compute=cs, precond=ps, table=as_tensor(rows, torch.int64),
        block_seg=as_tensor(seg_of_block, torch.int32), block_idx=as_tensor(idx_in_seg, torch.int32),
        blocks=as_tensor(blocks, torch.int64), offset_mod=mod,
        aligns=dict(x=_align(xs + (los or []), mod), v=_align(vs, mod), g=_align(gs, mod),
                    c=_align(cs, mod) if cs else 1, p=_align(ps, mod) if ps else 1),
    )



def reduce_segments(seg: Segments, *, seed: int, step: int, stream: int, noise: bool) -> torch.Tensor:
    """(vv, gg, vg, nn, nv, ng) per segment: float64 [segments, 6] on the shards' device."""
    _check_device(seg.v[0])
    programs = seg.block_seg.numel()
    partials = torch.empty((programs, 6), dtype=torch.float32, device=seg.v[0].device)
    _reduce_segments_kernel[(programs,)](
        seg.v[0], seg.g[0], seg.table, seg.block_seg, seg.block_idx, partials, seed,
        step & 0xFFFFFFFF, stream, OFFSET_MOD=seg.offset_mod, NOISE=bool(noise),
        ALIGN_V=seg.aligns["v"], ALIGN_G=seg.aligns["g"], BLOCK=BLOCK, COLUMNS=_COLUMNS,
        num_warps=_NUM_WARPS,
    )
    return torch.segment_reduce(partials.double(), "sum", lengths=seg.blocks, axis=0)


def update_segments(seg: Segments, coef: torch.Tensor, *, delta: float, seed: int, step: int,
                    stream: int, noise: bool) -> None:
    """In place for every segment i: v <- alpha_i v + beta_i g + gamma_i n; x <- x + delta v
    (x <- x + delta (v * p) with the segments' preconditioner p).

    coef: float32 [segments, 3] (alpha, beta, gamma) on the shards' device.
    """
    _check_device(seg.v[0])
    split = seg.x_lo is not None
    x_base = seg.x[0].view(torch.int16) if split else seg.x[0]
    _update_segments_kernel[(seg.block_seg.numel(),)](
        x_base, seg.x_lo[0] if split else x_base, seg.v[0], seg.g[0],
        seg.compute[0] if seg.compute else x_base, seg.precond[0] if seg.precond else seg.v[0], seg.table,
        seg.block_seg, seg.block_idx, coef,
        float(delta), seed, step & 0xFFFFFFFF, stream,
        OFFSET_MOD=seg.offset_mod, NOISE=bool(noise), HAS_COMPUTE=seg.compute is not None,
        SPLIT=split, ALIGN_X=seg.aligns["x"], ALIGN_V=seg.aligns["v"], ALIGN_G=seg.aligns["g"],
        ALIGN_C=seg.aligns["c"], BLOCK=BLOCK, COLUMNS=_COLUMNS,
        PRECOND=seg.precond is not None,
        ALIGN_P=seg.aligns["p"], num_warps=_NUM_WARPS,
    )
