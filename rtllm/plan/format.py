"""`rtllm plan`: the memory plan as a table, one column per registered layout.

The last line reads, for the chosen layout, `total X.X GiB of Y.Y GiB: fits` (or `: does not
fit`, after hints that say what would make it fit).
"""
from __future__ import annotations

import re

from rtllm.plan.memory import (BUILD, CONTEXT, FRAGMENTATION, FWD_BWD, GIB, HOST_BOUND, MARGIN, UNDO,
                               ModelShape, MemoryPlan, plan_memory)

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'24GiB' -> 24 * 2**30, '24GB' -> 24e9, '25769803776' -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 24GiB, 24GB or "
                         f"25769803776 (bytes)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    size = int(number * scale)
    if size < 1:
        raise ValueError(f"memory size {text!r} is not positive")
    return size


def _unit(largest: int) -> tuple[str, int]:
    for name, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= size:
            return name, size
    return "B", 1


def format_plan(plans: list[MemoryPlan], gpu_mem: int | None = None, *, chosen: str | None = None,
                hints: tuple[str, ...] = ()) -> str:
    """The plans as a table (component rows, one column per plan's layout); the last line is
    the verdict for `chosen` (default: the first plan's layout) against `gpu_mem` bytes."""
    if not plans:
        raise ValueError("format_plan needs at least one plan")
    gpu_mem = plans[0].gpu_mem if gpu_mem is None else gpu_mem
    main = next((p for p in plans if p.layout == (chosen or plans[0].layout)), None)
    if main is None:
        raise ValueError(f"chosen layout {chosen!r} is not among the plans ({', '.join(p.layout for p in plans)})")
    unit, scale = _unit(max(p.total for p in plans))
    width = 46

    def row(label: str, values: list[int | None], mark: list[bool] | None = None) -> str:
        cells = "".join(f"{'-' if v is None else f'{v / scale:.2f} {unit}':>13}{'*' if mark and mark[i] else ' '}"
                        for i, v in enumerate(values))
        return f"{label:<{width}}{cells}".rstrip()

    def rows(get) -> list[str]:
        names = [n for n in dict.fromkeys(k for p in plans for k in get(p)) if any(get(p).get(n) for p in plans)]
        return [row("    " + n, [get(p).get(n, 0) for p in plans]) for n in names]

    cpu = main.device == "cpu"
    lines = [f"Memory plan: {main.model}, {main.num_params:,} parameters ({main.sampled_params:,} sampled); "
             f"batch {main.batch} x {main.seq} tokens, micro-batch {main.micro_batch}; {main.device}, "
             f"{main.compute_dtype} compute",
             f"{'':<{width}}" + "".join(f"{p.layout:>13} " for p in plans).rstrip(),
             "persistent (from the sampler's construction on)"]
    lines += rows(lambda p: p.persistent)
    lines.append(row("  = persistent", [sum(p.persistent.values()) for p in plans]))
    lines.append("phases: peak allocated, and what each adds (* the largest)")
    for phase in dict.fromkeys(k for p in plans for k in p.transients):
        label = phase + {FWD_BWD: f" (peak in {main.activation_phase})" if main.activation_phase else "",
                         BUILD: " (buffers + loaded model)"}.get(phase, "")
        lines.append(row("  " + label, [p.phase_totals.get(phase) for p in plans],
                         [p.peak_phase == phase for p in plans]))
        lines += rows(lambda p, ph=phase: p.transients.get(ph, {}))
    lines.append(row("peak allocated", [p.peak_allocated for p in plans]))
    lines.append(row(f"{MARGIN} ({FRAGMENTATION:.0%} of the peak)", [p.components[MARGIN] for p in plans]))
    if not cpu:
        lines.append(row(f"{CONTEXT} (outside the allocator)", [p.components[CONTEXT] for p in plans]))
    lines.append(row("total", [p.total for p in plans]))
    if any(p.host for p in plans):
        lines.append("host memory (not on the GPU)")
        lines += rows(lambda p: p.host)
        lines.append(row("  = host memory", [p.host_total for p in plans]))
    if any(p.disk for p in plans):
        lines.append("disk (scratch files in --out while the run goes)")
        lines += rows(lambda p: p.disk)
    lines.append(host_line(main))
    lines += [f"note: {n}" for n in main.notes]
    lines += list(hints)
    lines.append(verdict(main, gpu_mem))
    return "\n".join(lines)


def host_line(plan: MemoryPlan) -> str:
    """The host memory the run needs against a 16 GiB PC, and what is not in it."""
    host = plan.host_total
    within = (f"within {HOST_BOUND / GIB:.0f} GiB" if host <= HOST_BOUND
              else f"more than {HOST_BOUND / GIB:.0f} GiB")
    parked = " (the dt-auto snapshot goes to disk)" if plan.disk and plan.device != "cpu" else ""
    return (f"host memory {host / GIB:.1f} GiB{parked}: {within}, plus the Python process and its "
            f"libraries; checkpoints are read as views of the file (page cache, not counted)")


def verdict(plan: MemoryPlan, gpu_mem: int | None) -> str:
    """`total X.X GiB of Y.Y GiB: fits` (or `: does not fit`)."""
    total = f"total {plan.total / GIB:.1f} GiB"
    if gpu_mem is None:
        return f"{total} (give --gpu-mem to check it fits)"
    if not plan.activations_known:
        return f"{total} without activations, of {gpu_mem / GIB:.1f} GiB: cannot tell (activations unknown)"
    return f"{total} of {gpu_mem / GIB:.1f} GiB: {'fits' if plan.total <= gpu_mem else 'does not fit'}"


def fit_hints(shape: ModelShape, plan: MemoryPlan, kwargs: dict) -> tuple[str, ...]:
    """For a plan that does not fit: by how much, and which one change would make it fit."""
    if plan.fits is not False:
        return ()
    hints = [f"does not fit by {(plan.total - plan.gpu_mem) / GIB:.1f} GiB (peak in: {plan.peak_phase})"]
    tries = []
    if plan.persistent.get(UNDO):
        tries.append(("no undo copy (rtllm sample makes one only with room for it; plan --undo no)",
                      dict(undo_backup=False)))
    if BUILD in plan.transients:
        tries.append(("the model built on the meta device (rtllm.lm.model_io.meta_model)", dict(from_meta=True)))
    micro = plan.micro_batch
    while micro > 1:
        micro //= 2
        if plan.batch % micro == 0:
            tries.append((f"--micro-batch {micro}", dict(micro_batch=micro)))
    for label, change in tries:
        alt = plan_memory(shape, **{**kwargs, **change})
        if alt.fits:
            hints.append(f"fits with {label}: total {alt.total / GIB:.1f} GiB")
            break
    else:
        hints.append("no single change among " + ", ".join(label for label, _ in tries) + " makes it fit"
                     if tries else "no option of this run makes it fit: a larger GPU is needed")
    return tuple(hints)
