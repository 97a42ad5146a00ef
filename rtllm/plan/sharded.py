"""Per-rank memory of one chain sharded over W ranks (`rtllm plan --world-size W`).

From the one-process plan (rtllm.plan.memory) at the per-rank batch: the sampler's state and
everything sized like it divided by W; the activations of B/W sequences in full on every rank;
plus what FSDP2 holds (rtllm.lm.fsdp: one unit per block, the root unit for the rest):

- all-gather buffers: the unsharded compute weights of two blocks (the one running and the one
  prefetched) and of the root unit (embeddings, head, final norm: gathered for the whole
  forward and backward);
- reduce-scatter buffers of the largest unit: its unsharded gradient (compute dtype), the
  float64 copy that is reduced (rtllm.lm.fsdp sums in float64), and the float64 shard it returns;
- the exact reduce pass's scratch (rtllm.state.exact_sums: EXACT_SCRATCH_BYTES per element of a
  chunk of EXACT_CHUNK_CUDA elements on CUDA, EXACT_CHUNK on CPU).

Every term is added to the peak even where two never coexist (the step's scratch and the
backward's buffers): an upper bound, by at most the smaller of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rtllm.plan.memory import (CONTEXT, FRAGMENTATION, GIB, GRADIENTS, NOISE, POSITION, PRIOR,
                               SEGMENT_TABLES, UNDO, VELOCITY, WEIGHTS, ModelShape, model_shape,
                               plan_memory)

SHARDED_ROWS = (WEIGHTS, POSITION, VELOCITY, GRADIENTS, PRIOR, UNDO, NOISE, SEGMENT_TABLES)
ALL_GATHER, REDUCE_SCATTER = "FSDP all-gather (2 blocks + root)", "FSDP reduce-scatter (largest unit)"
EXACT_SCRATCH, ACTIVATIONS = "exact-sum scratch", "activations (B/W sequences)"


@dataclass(frozen=True)
class ShardedPlan:
    model: str
    world_size: int
    batch_per_rank: int
    rows: dict[str, int]  # bytes per rank
    activations_known: bool
    gpu_mem: int | None

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool | None:
        if self.gpu_mem is None or not self.activations_known:
            return None
        return self.total <= self.gpu_mem


def unit_sizes(config) -> tuple[int, int]:
    """(parameters of the largest block, parameters outside every block) of the model."""
    from rtllm.lm.fsdp import block_modules
    from rtllm.plan.memory import _meta_model

    model = _meta_model(config)
    blocks = block_modules(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    largest = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    return largest, root


def plan_sharded(config, *, world_size: int, batch: int, seq: int, device: str = "cuda",
                 gpu_mem_bytes: int | None = None, **kwargs) -> ShardedPlan:
    """Per-rank bytes of a chain over `world_size` ranks; kwargs as plan_memory (layout fp32)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"--world-size must be an integer >= 1, got {world_size!r}")
    if batch % world_size:
        raise ValueError(f"--batch ({batch}) must be a multiple of --world-size ({world_size}): "
                         f"every rank takes the same share of the minibatch")
    shape = config if isinstance(config, ModelShape) else model_shape(config)
    per_rank = batch // world_size
    one = plan_memory(shape, batch=per_rank, seq=seq, device=device, layout="fp32",
                      gpu_mem_bytes=None, **kwargs)
    a = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}[one.compute_dtype]
    rows = {row: math.ceil(one.persistent.get(row, 0) / world_size) for row in SHARDED_ROWS}
    block, root = unit_sizes(shape.config)
    rows[ALL_GATHER] = a * (2 * block + root) if world_size > 1 else 0
    largest = max(block, root)
    rows[REDUCE_SCATTER] = (a + 8) * largest + math.ceil(8 * largest / world_size) \
        if world_size > 1 else 0
    from rtllm.state.exact_sums import EXACT_CHUNK, EXACT_CHUNK_CUDA, EXACT_SCRATCH_BYTES

    chunk = EXACT_CHUNK_CUDA if str(device).startswith("cuda") else EXACT_CHUNK
    rows[EXACT_SCRATCH] = EXACT_SCRATCH_BYTES * chunk
    known = one.activations_known
    if known:
        from rtllm.plan.activations import PARTS

        rows[ACTIVATIONS] = sum(one.transients.get("forward/backward", {}).get(p, 0) for p in PARTS)
    rows["allocator margin"] = math.ceil(FRAGMENTATION * sum(rows.values()))
    rows[CONTEXT] = one.components.get(CONTEXT, 0)
    return ShardedPlan(model=shape.name, world_size=world_size, batch_per_rank=per_rank, rows=rows,
                       activations_known=known, gpu_mem=gpu_mem_bytes)


def format_sharded_plan(plan: ShardedPlan) -> str:
    """The rows in GiB, and the fits line."""
    lines = [f"Per-rank memory plan: {plan.model} sharded over {plan.world_size} ranks, "
             f"{plan.batch_per_rank} sequences per rank"]
    lines += [f"    {name:<44}{value / GIB:>9.2f} GiB" for name, value in plan.rows.items()]
    if not plan.activations_known:
        lines.append(f"    {ACTIVATIONS:<44}{'not estimated':>13} (architecture not modelled)")
    total = f"total per rank {plan.total / GIB:.2f} GiB"
    if plan.gpu_mem is None:
        lines.append(total)
    elif plan.fits is None:
        left = (plan.gpu_mem - plan.total) / GIB
        verdict = f"{left:.2f} GiB left for them" if left > 0 else "does not fit"
        lines.append(f"{total} of {plan.gpu_mem / GIB:.1f} GiB before activations: {verdict}")
    else:
        lines.append(f"{total} of {plan.gpu_mem / GIB:.1f} GiB: "
                     f"{'fits' if plan.fits else 'does not fit'}")
    return "\n".join(lines)
