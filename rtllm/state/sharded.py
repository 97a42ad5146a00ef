"""One chain over several processes: the sampler's state on local shards of FSDP2 parameters.

`ShardedState` is what a sampler needs to run on parameters sharded by
`torch.distributed.fsdp.fully_shard` (DTensors, Shard(0) over a 1-D mesh):

- flat buffers over the *local* shards: one Shard per local piece of a parameter, whose position
  x is the FSDP shard's own storage (fp32 models: no second copy; FSDP all-gathers from it, so
  the update pass is what the next forward sees), with the piece's global offset in the
  unsharded parameter vector, so the noise of every element is that of the one-process chain;
- gradients: FSDP leaves a reduce-scattered DTensor `.grad`; `pull_grads` adds its local shard
  into the flat gradient buffer and clears it;
- the reduce pass: exact per-ray sums (rtllm.state.exact_sums), integers that one all-reduce
  (SUM, int64) combines over the ranks together with the non-finite counts, so every rank takes
  the same decision and the same float64 sums. That is the only collective of a sampler step.

Without a process group (plain parameters, one process) the same class gives the exact-sum chain
that a sharded run equals bit for bit: the reference of tests and of `--shard-state` on one process.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from rtllm.kernels.philox import philox_normals
from rtllm.state.exact_sums import NUM_LIMBS, carry_, limbs_to_float, pieces_limbs
from rtllm.state.flat import FlatGroup, Shard, Slot

_V_BAD, _G_BAD = 0, 1
_WITH_GRADIENT = [1, 2, 5]  # gg, vg, ng: the sums that a non-finite gradient makes NaN


def _local_piece(p: Tensor) -> tuple[Tensor, int] | None:
    """The process's piece of DTensor parameter p and the flat index of its first element
    within p; None for a plain parameter."""
    from torch.distributed.tensor import DTensor, Shard as ShardPlacement

    if not isinstance(p, DTensor):
        return None
    placement = p.placements[0]
    if p.device_mesh.ndim != 1 or not isinstance(placement, ShardPlacement) or placement.dim != 0:
        raise ValueError(f"sharded sampling needs parameters sharded on dimension 0 of a 1-D mesh "
                         f"(fully_shard(model) with its defaults), got placements {p.placements}")
    local = p.to_local().detach()  # the shard storage itself, outside autograd
    # torch.chunk semantics (as fully_shard): rank r holds rows [r*c, (r+1)*c), c = ceil(rows/W)
    rows = p.shape[0]
    per_rank = -(-rows // p.device_mesh.size())
    first_row = min(p.device_mesh.get_local_rank() * per_rank, rows)
    row_numel = p.numel() // rows if rows else 0
    return local, first_row * row_numel


class ShardedState:
    """Flat buffers over local shards, exact per-ray sums and their one all-reduce per step.

    group: the process group the parameters are sharded over (None: the default group when
    torch.distributed is initialized, else one process).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self._fsdp_params: list[tuple[Tensor, Tensor]] = []  # (DTensor parameter, its grad view)

    # -- the buffers ------------------------------------------------------------------------
    def build_groups(self, param_groups: list[dict], *, layout: str) -> list[FlatGroup]:
        """One FlatGroup per parameter group; one Shard per local piece of a parameter."""
        if layout != "fp32":
            raise ValueError(f"sharded sampling supports layout 'fp32' only, got {layout!r}")
        sizes = [sum(p.numel() for p in g["params"]) for g in param_groups]
        total, base, groups = sum(sizes), 0, []
        for g, size in zip(param_groups, sizes):
            groups.append(self._build_group(g["params"], base, total))
            base += size
        return groups

    def _build_group(self, params: list[Tensor], base: int, total: int) -> FlatGroup:
        shards, slots, stand_ins, grad_views, offset = [], [], [], [], base
        for p in params:
            piece = _local_piece(p)
            local, within = piece if piece is not None else (p.data, 0)
            if not local.is_contiguous():
                raise ValueError(f"a local shard of shape {tuple(local.shape)} is not contiguous; "
                                 f"shard with fully_shard's default placements")
            flat = local.view(-1)
            fp32 = local.dtype == torch.float32
            x = flat if fp32 else flat.float()  # the fp32 position is FSDP's storage when it can be
            n = flat.numel()
            shards.append(Shard(x=x, v=torch.zeros(n, dtype=torch.float32, device=flat.device),
                                g=torch.zeros(n, dtype=local.dtype, device=flat.device),
                                compute=None if fp32 else flat, offset=offset + within,
                                total_numel=total))
            slots.append(Slot(len(shards) - 1, 0, n, local.shape))
            grad_view = shards[-1].g.view(local.shape)
            if piece is None:  # a plain parameter: autograd accumulates into the buffer
                stand_in = p
            else:  # FSDP's DTensor: its grad is pulled in by pull_grads
                stand_in = torch.nn.Parameter(local, requires_grad=p.requires_grad)
                self._fsdp_params.append((p, grad_view))
            stand_in.grad = grad_view
            stand_ins.append(stand_in)
            grad_views.append(grad_view)
            offset += p.numel()
        return FlatGroup(stand_ins, shards, slots, sum(s.numel for s in shards), grad_views)

    @torch.no_grad()
    def pull_grads(self) -> None:
        """Add FSDP's reduce-scattered gradients into the flat gradient buffer; clear them."""
        for p, grad_view in self._fsdp_params:
            if p.grad is not None:
                grad_view.add_(p.grad.to_local())
                p.grad = None  # FSDP makes a new one at the next backward

    # -- the reduce pass --------------------------------------------------------------------
    @torch.no_grad()
    def ray_sums(self, flat: list[FlatGroup], ray_of_group: list[int], num_rays: int, backend,
                 key: dict) -> np.ndarray:
        """float64 sums [rays, 6] over all ranks; NaN where a value or gradient is not finite."""
        device = flat[0].shards[0].x.device
        limbs = torch.zeros(num_rays, 6, NUM_LIMBS, dtype=torch.int64, device=device)
        bad = torch.zeros(num_rays, 2, dtype=torch.int64, device=device)
        for fg, ray in zip(flat, ray_of_group):  # small shards are joined into one pass
            pieces = [(s.v, s.g, shard_noise(backend, s, key) if key["noise"] else None)
                      for s in fg.shards if s.numel]
            group_sums, group_bad = pieces_limbs(pieces)
            limbs[ray] += group_sums.to(device)
            carry_(limbs[ray])
            bad[ray] += group_bad.to(device)
        packed = torch.cat([limbs.view(-1), bad.view(-1)])
        if self.distributed:  # the one collective of the step: integers, so any order agrees
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        packed = packed.cpu()  # the one host sync of the step
        limbs = carry_(packed[: limbs.numel()].view(num_rays, 6, NUM_LIMBS))
        bad = packed[limbs.numel():].view(num_rays, 2).numpy()
        sums = np.array(limbs_to_float(limbs), dtype=np.float64).reshape(num_rays, 6)
        sums[np.ix_(bad[:, _G_BAD] > 0, _WITH_GRADIENT)] = np.nan
        sums[bad[:, _V_BAD] > 0] = np.nan
        return sums


def shard_noise(backend, shard: Shard, key: dict) -> Tensor:
    """The fp32 noise of a shard for this step, as the backend's update pass will apply it.

    The torch backend keeps it in its noise cache (marked as this step's), so its update pass
    does not draw it again; the Philox backends regenerate it from the global index anyway.
    """
    seed, step, stream = key["seed"], key["step"], key["stream"]
    if getattr(backend, "name", "") != "torch":
        return philox_normals(seed, step, stream, shard.offset, shard.numel, device=shard.x.device)
    cache, fresh = backend._noise_buffer(shard, (seed, step, stream))
    out = cache if cache is not None else \
        torch.empty(shard.numel, dtype=torch.float32, device=shard.x.device)
    if not fresh:
        for start, n, chunk, within in backend._pieces(shard):
            backend._draw(out[start : start + n], shard, chunk, within, (seed, step, stream))
    return out
