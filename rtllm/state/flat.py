"""Flat parameter buffers: a group's parameters packed into contiguous shards.

Per shard: fp32 position x (the master weights), fp32 velocity v, a gradient buffer g in the
parameters' dtype, and the compute copy the model runs with (the parameters' dtype; when that
is fp32 the compute copy *is* x, no second copy). Module parameters become views of the compute
copy, so the update pass refreshes the model in place, and each `.grad` is a view of g, so
autograd accumulates straight into the buffer.

Parameters on the meta device (a model built under `torch.device("meta")`) are materialized
straight into the buffers: the model is never allocated or initialized on its own, and the
initializer writes the fp32 position directly (docs/benchmarks.md: GPT-2 1.5B on the 24 GB CPU
machine, 12 bytes/parameter). `build_group(..., device=)`
allocates the shards and swaps each meta parameter for an fp32 view of x (same Python object,
so tied weights stay tied and optimizer groups stay valid); x is NaN until an initializer
writes it; `finish_materialize` then checks that every element was written, fills the compute
copy and binds parameters and gradients as `build_group` does for ordinary parameters.

Layouts (rtllm.state.layouts): "fp32" is the above. "fp32-split" (bf16 models only) keeps the same
fp32 position as two 16-bit planes: x is the bf16 high plane, which is also the compute copy the
parameters view (so there is no second copy: 10 instead of 12 bytes/parameter), and x_lo the
int16 low plane (rtllm/kernels/reference.py: split_fp32); meta parameters become views of the high
plane. `Shard.position()` / `set_position()` read and write the fp32 position in any layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from rtllm.kernels.reference import join_fp32, split_fp32

MAX_SHARD_ELEMENTS = 2**31 - 1  # int32 indexing limit of many kernels and libraries
_SPLIT_SLICE = 2**22  # elements per slice when joining / splitting fp32-split planes


@dataclass
class Shard:
    x: Tensor  # fp32 position, 1-D (fp32-split layout: its bf16 high plane, see x_lo)
    v: Tensor  # fp32 velocity
    g: Tensor  # gradient, parameters' dtype
    compute: Tensor | None  # low-precision copy the model uses; None when that is x itself
    # Global index of x[0] in the sampler's whole parameter vector (all groups): the noise is
    # keyed on it, so it depends neither on sharding nor on grouping, and groups never share it.
    offset: int
    total_numel: int  # size of that whole vector
    # fp32-split layout: the int16 low plane of the position, x its bf16 high plane; else None.
    x_lo: Tensor | None = None
    # pSMILE's diagonal preconditioner (fp32, set by rtllm.samplers.smile_precond): the update
    # pass drifts x by delta * (v * precond) instead of delta * v. None: no preconditioner.
    precond: Tensor | None = None

    @property
    def numel(self) -> int:
        return self.x.numel()

    def position(self, sl: slice = slice(None), *, copy: bool = False) -> Tensor:
        """The fp32 position (of elements `sl`): x itself (a copy if `copy`), or joined planes."""
        if self.x_lo is None:
            return self.x[sl].clone() if copy else self.x[sl]
        hi, lo = self.x[sl], self.x_lo[sl]
        out = torch.empty(hi.shape, dtype=torch.float32, device=hi.device)
        # In slices: joining a whole shard at once would make int32 temporaries of 8 bytes/param.
        for start in range(0, hi.numel(), _SPLIT_SLICE):
            part = slice(start, start + _SPLIT_SLICE)
            out[part] = join_fp32(hi[part], lo[part])
        return out

    def position_state(self) -> Tensor | dict[str, Tensor]:
        """The position as a sampler state holds it, without a copy: x (fp32), or the split
        planes {"hi": bf16, "lo": int16} as they are. Joined, they would be a new fp32 copy of
        the shard on its device (4 B/param) while a checkpoint is written; set_position joins
        them slice by slice where a state moves to the fp32 layout."""
        return self.x if self.x_lo is None else {"hi": self.x, "lo": self.x_lo}

    def set_position(self, value: Tensor | dict[str, Tensor]) -> None:
        """Write the whole position (fp32, or split planes as position_state gives them) and
        whatever mirrors it (compute copy or split planes)."""
        if isinstance(value, dict):
            hi, lo = _planes(value, self.numel)
            if self.x_lo is not None:  # the same layout: the planes, bit for bit
                self.x.copy_(hi)
                self.x_lo.copy_(lo)
                return
            for start in range(0, self.numel, _SPLIT_SLICE):  # in slices, as in position()
                part = slice(start, start + _SPLIT_SLICE)
                self.x[part].copy_(join_fp32(hi[part].contiguous(), lo[part].contiguous()))
            if self.compute is not None:
                self.compute.copy_(self.x)
            return
        if self.x_lo is None:
            self.x.copy_(value)
            if self.compute is not None:
                self.compute.copy_(self.x)
        else:
            for start in range(0, self.numel, _SPLIT_SLICE):  # in slices, as in position()
                part = slice(start, start + _SPLIT_SLICE)
                hi, lo = split_fp32(value[part].to(device=self.x.device, dtype=torch.float32).contiguous())
                self.x[part].copy_(hi)
                self.x_lo[part].copy_(lo)


def position_state_numel(value) -> int:
    """Elements of one shard's position in a state (fp32 tensor or split planes); -1 if neither."""
    if isinstance(value, dict):
        value = value.get("hi")
    return value.numel() if isinstance(value, Tensor) else -1


def check_position_state(value, numel: int) -> None:
    """Refuse a shard's position state that is neither `numel` values nor two sound planes."""
    if isinstance(value, dict):
        _planes(value, numel)
    elif not (isinstance(value, Tensor) and value.numel() == numel and value.is_floating_point()):
        raise ValueError(f"a position state needs {numel} floating-point values or split planes; "
                         f"got {type(value).__name__}")


def _planes(value: dict, numel: int) -> tuple[Tensor, Tensor]:
    """The (hi, lo) planes of a split position state, checked: a damaged state is refused."""
    hi, lo = value.get("hi"), value.get("lo")
    if not (isinstance(hi, Tensor) and isinstance(lo, Tensor) and hi.dtype == torch.bfloat16
            and lo.dtype == torch.int16 and hi.numel() == lo.numel() == numel and hi.device == lo.device):
        got = {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) if isinstance(t, Tensor) else t
               for k, t in value.items()}
        raise ValueError(f"a split position state needs 'hi' (bfloat16) and 'lo' (int16) planes of "
                         f"{numel} elements each; got {got}")
    return hi.reshape(-1), lo.reshape(-1)


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
    # Set while meta parameters are bound to x but not yet checked and bound to compute/g.
    pending_dtype: torch.dtype | None = None

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
                base_offset: int = 0, total_numel: int | None = None,
                device: torch.device | str | None = None, layout: str = "fp32") -> FlatGroup:
    """Move `params` into flat shards; the parameters become views of the compute buffer.

    layout: "fp32" or "fp32-split" (bf16 parameters only; see the module docstring).
    base_offset: global index of the group's first element; total_numel: elements of all groups.
    device: where the buffers go; required for meta parameters (which then become NaN fp32
    views of x, to be written in place and passed to `finish_materialize`), else it must be
    the parameters' own device.
    """
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params}
    if len(devices) != 1 or len(dtypes) != 1:
        raise ValueError(
            f"a parameter group must share one device and dtype, got {sorted(map(str, devices))} "
            f"and {sorted(map(str, dtypes))}; put differing parameters in separate groups"
        )
    (param_device,), (dtype,) = devices, dtypes
    if layout not in ("fp32", "fp32-split"):
        raise ValueError(f"layout must be 'fp32' or 'fp32-split', got {layout!r}")
    split = layout == "fp32-split"
    if split and dtype != torch.bfloat16:
        raise ValueError(f"layout 'fp32-split' needs bf16 parameters (its high plane is the "
                         f"model's bf16 weights), got {dtype}: convert the model with "
                         f"model.to(torch.bfloat16), or use layout='fp32'")
    meta = param_device.type == "meta"
    device = _buffer_device(param_device, device)
    slots, sizes = _pack(params, max_shard)
    shards, offset = [], base_offset
    total = base_offset + sum(sizes) if total_numel is None else total_numel
    for n in sizes:
        x = torch.empty(n, dtype=torch.bfloat16 if split else torch.float32, device=device)
        compute = None if dtype == torch.float32 or split else \
            torch.empty(n, dtype=dtype, device=device)
        shards.append(
            Shard(x=x, v=torch.zeros(n, dtype=torch.float32, device=device),
                  g=torch.zeros(n, dtype=dtype, device=device), compute=compute, offset=offset,
                  total_numel=total,
                  x_lo=torch.zeros(n, dtype=torch.int16, device=device) if split else None)
        )
        offset += n
    group = FlatGroup(list(params), shards, slots, offset - base_offset)
    if meta:
        _bind_meta(group, dtype)
        return group
    with torch.no_grad():
        for i, p in enumerate(params):
            group.view("x", i).copy_(p)  # a split position starts at the bf16 weights, lo = 0
            target = group.view("x" if dtype == torch.float32 or split else "compute", i)
            if dtype != torch.float32 and not split:
                target.copy_(p)
            p.data = target  # the model now computes with the buffer
            group.grad_views.append(group.view("g", i))
            if p.grad is None:
                p.grad = group.grad_views[i]
            # A .grad that existed before is left alone; step() copies it in.
    return group


def _buffer_device(param_device: torch.device, device: torch.device | str | None) -> torch.device:
    if param_device.type == "meta":
        if device is None:
            raise ValueError("the parameters are on the meta device (they have no values yet): "
                             "pass device='cpu' or 'cuda' for the flat buffers they are "
                             "materialized into")
        device = torch.device(device)
        if device.type == "meta":
            raise ValueError("device='meta' holds no values; pass device='cpu' or 'cuda' for "
                             "the flat buffers")
        return device
    wanted = None if device is None else torch.device(device)
    if wanted is not None and (wanted.type != param_device.type
                               or wanted.index not in (None, param_device.index)):
        raise ValueError(f"the parameters are on {param_device} but device={str(device)!r}: "
                         f"device= places meta parameters only; move the model with "
                         f"model.to({str(device)!r}) instead")
    return param_device


def _bind_meta(group: FlatGroup, dtype: torch.dtype) -> None:
    """Swap each meta parameter for an fp32 view of x (NaN until an initializer writes it).

    swap_tensors keeps the Python object, so every module attribute that refers to it (tied
    weights) and the optimizer's parameter groups now see the buffer; the meta parameter's
    attributes are kept. The initializer writes fp32 x directly, so a low-precision model's
    master weights are not rounded to its compute dtype.
    """
    for shard in group.shards:
        shard.x.fill_(float("nan"))
    for i, p in enumerate(group.params):
        view = group.view("x", i)
        new = torch.nn.Parameter(view, requires_grad=p.requires_grad)
        new.__dict__.update(p.__dict__)
        try:
            torch.utils.swap_tensors(p, new)
        except RuntimeError as err:
            raise ValueError(f"cannot materialize a meta parameter of shape {tuple(p.shape)} "
                             f"({err}); build the sampler before any forward pass and keep no "
                             f"other references (weakrefs, views) to the meta parameters") from err
    group.pending_dtype = dtype


@torch.no_grad()
def finish_materialize(group: FlatGroup, *, check_chunk: int = 2**24) -> None:
    """After the initializer: check x is fully written, fill compute, bind params and grads.

    Raises ValueError naming the first parameter (index and shape) with a non-finite value
    (NaN means the initializer never wrote it). The check runs over fixed-size chunks, so it
    needs no full-size temporary.
    """
    if group.pending_dtype is None:
        raise ValueError("finish_materialize() applies to a group built from meta parameters, "
                         "once; this group is already materialized")
    for si, shard in enumerate(group.shards):
        for start in range(0, shard.numel, check_chunk):
            chunk = shard.x[start : start + check_chunk]
            if not bool(torch.isfinite(chunk).all()):
                bad = start + int((~torch.isfinite(chunk)).nonzero()[0, 0])
                i = next(i for i, s in enumerate(group.slots)
                         if s.shard == si and s.start <= bad < s.start + s.numel)
                raise ValueError(
                    f"parameter {i} of the group (shape {tuple(group.slots[i].shape)}) is not "
                    f"finite after initialization (NaN: the initializer never wrote it); the "
                    f"initializer must fill every parameter in place")
        if shard.compute is not None:
            shard.compute.copy_(shard.x)
    # fp32-split: the parameters are views of the bf16 high plane already, nothing to rebind.
    low_precision = group.pending_dtype != torch.float32 and group.shards[0].compute is not None
    for i, p in enumerate(group.params):
        if low_precision:
            p.data = group.view("compute", i)  # same device: an ordinary rebind
        group.grad_views.append(group.view("g", i))
        p.grad = group.grad_views[i]
    group.pending_dtype = None


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
