"""Flat parameter buffers: a group's parameters packed into contiguous shards.

Per shard: fp32 position x (the master weights), fp32 velocity v, a gradient buffer g in the
parameters' dtype, and the compute copy the model runs with (the parameters' dtype; when that
is fp32 the compute copy *is* x, no second copy). Module parameters become views of the compute
copy, so the update pass refreshes the model in place, and each `.grad` is a view of g, so
autograd accumulates straight into the buffer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

MAX_SHARD_ELEMENTS = 2**31 - 1  # int32 indexing limit of many kernels and libraries


@dataclass
class Shard:
    x: Tensor  # fp32 position, 1-D
    v: Tensor  # fp32 velocity
    g: Tensor  # gradient, parameters' dtype
    compute: Tensor | None  # low-precision copy the model uses; None when that is x itself
    # Global index of x[0] in the sampler's whole parameter vector (all groups): the noise is
    # keyed on it, so it depends neither on sharding nor on grouping, and groups never share it.
    offset: int
    total_numel: int  # size of that whole vector

    @property
    def numel(self) -> int:
        return self.x.numel()


@dataclass
class Slot:
    """Where one parameter lives: shard index and element range."""

    shard: int
    start: int
    numel: int
    shape: torch.Size


@dataclass
class FlatGroup:
    params: list[torch.nn.Parameter]
    shards: list[Shard]
    slots: list[Slot]
    numel: int
    grad_views: list[Tensor] = field(default_factory=list)

    def view(self, buffer: str, i: int) -> Tensor:
        slot = self.slots[i]
        flat = getattr(self.shards[slot.shard], buffer)
        return flat[slot.start : slot.start + slot.numel].view(slot.shape)


def _pack(params: list[torch.nn.Parameter], max_shard: int) -> tuple[list[Slot], list[int]]:
    """Greedy packing in order; a parameter never straddles two shards."""
    slots, sizes = [], [0]
    for p in params:
        n = p.numel()
        if n > max_shard:
            raise ValueError(
                f"a parameter of {n} elements exceeds the shard limit of {max_shard}; split it"
            )
        if sizes[-1] + n > max_shard:
            sizes.append(0)
        slots.append(Slot(len(sizes) - 1, sizes[-1], n, p.shape))
        sizes[-1] += n
    return slots, sizes


def build_group(params: list[torch.nn.Parameter], max_shard: int = MAX_SHARD_ELEMENTS, *,
                base_offset: int = 0, total_numel: int | None = None) -> FlatGroup:
    """Move `params` into flat shards; the parameters become views of the compute buffer.

    base_offset: global index of the group's first element; total_numel: elements of all groups.
    """
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params}
    if len(devices) != 1 or len(dtypes) != 1:
        raise ValueError(
            f"a parameter group must share one device and dtype, got {sorted(map(str, devices))} "
            f"and {sorted(map(str, dtypes))}; put differing parameters in separate groups"
        )
    (device,), (dtype,) = devices, dtypes
    slots, sizes = _pack(params, max_shard)
    shards, offset = [], base_offset
    total = base_offset + sum(sizes) if total_numel is None else total_numel
    for n in sizes:
        x = torch.empty(n, dtype=torch.float32, device=device)
        compute = None if dtype == torch.float32 else torch.empty(n, dtype=dtype, device=device)
        shards.append(
            Shard(x=x, v=torch.zeros(n, dtype=torch.float32, device=device),
                  g=torch.zeros(n, dtype=dtype, device=device), compute=compute, offset=offset,
                  total_numel=total)
        )
        offset += n
    group = FlatGroup(list(params), shards, slots, offset - base_offset)
    with torch.no_grad():
        for i, p in enumerate(params):
            group.view("x", i).copy_(p)
            target = group.view("x" if dtype == torch.float32 else "compute", i)
            if dtype != torch.float32:
                target.copy_(p)
            p.data = target  # the model now computes with the buffer
            group.grad_views.append(group.view("g", i))
            if p.grad is None:
                p.grad = group.grad_views[i]
            # A .grad that existed before is left alone; step() copies it in.
    return group


def collect_grads(group: FlatGroup) -> None:
    """Make the gradient buffer hold every parameter's current gradient.

    Gradients that do not alias their slot (a .grad from before construction, one re-created
    after zero_grad(set_to_none=True), or assigned by user code) are copied in, and the slot view
    is put back so the next backward accumulates in place. A missing .grad counts as zero.
    """
    for p, slot_view in zip(group.params, group.grad_views):
        grad = p.grad
        if grad is not None and _aliases(grad, slot_view):
            continue
        if grad is None:
            slot_view.zero_()
        else:
            if grad.is_sparse:
                raise TypeError("sparse gradients are not supported: use dense embeddings "
                                "(nn.Embedding(sparse=False))")
            if grad.shape != slot_view.shape:
                raise ValueError(f"a gradient of shape {tuple(grad.shape)} was assigned to a "
                                 f"parameter of shape {tuple(slot_view.shape)}")
            slot_view.copy_(grad)
        p.grad = slot_view


def zero_grads(group: FlatGroup) -> None:
    """Zero in place (set_to_none would detach the .grad views from the buffer)."""
    for shard in group.shards:
        shard.g.zero_()
    for p, slot_view in zip(group.params, group.grad_views):
        if p.grad is None or not _aliases(p.grad, slot_view):
            p.grad = slot_view


def _aliases(a: Tensor, b: Tensor) -> bool:
    if a.layout != torch.strided:
        return False
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())
