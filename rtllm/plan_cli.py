"""`rtllm plan`: the memory plan as a table, one column per registered layout.

The last line reads, for the chosen layout, `total X.X GiB of Y.Y GiB: fits` (or `: does not
fit`, after hints that say what would make it fit).
"""
from __future__ import annotations

import argparse
import re

from rtllm.layouts import DEFAULT_LAYOUT, LAYOUTS
from rtllm.plan import (BUILD, CONTEXT, DT_TRIALS, FRAGMENTATION, FWD_BWD, GIB, MARGIN, UNDO, ModelShape,
                        MemoryPlan, model_shape, plan_all_layouts, plan_memory)

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
    lines += [f"note: {n}" for n in main.notes]
    lines += list(hints)
    lines.append(verdict(main, gpu_mem))
    return "\n".join(lines)


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
    if DT_TRIALS in plan.transients:
        tries.append(("a fixed --dt (no device copy of x and v for the dt trials)", dict(dt_auto=False)))
    if plan.persistent.get(UNDO):
        tries.append(("no undo copy (rtllm sample makes one only with room for it; plan --undo no)",
                      dict(undo_backup=False)))
    if BUILD in plan.transients:
        tries.append(("the model built on the meta device (rtllm.model_io.meta_model)", dict(from_meta=True)))
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


# -- the command ------------------------------------------------------------------------------------
def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_plan_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--model", required=True, help="a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local "
      "model directory (only its config.json is read)")
    a("--batch", type=int, default=8, help="sequences per step (%(default)s)")
    a("--seq", type=int, help="tokens per sequence (default: the model's context)")
    a("--micro-batch", type=int, help="sequences per forward/backward (default: the whole batch)")
    a("--layout", choices=list(LAYOUTS), default=DEFAULT_LAYOUT, help="state layout the verdict is "
      "for; every registered layout gets a column (%(default)s)")
    a("--gpu-mem", type=_size_arg, default="24GiB", help="memory to fit in: 24GiB, 24GB or bytes "
      "(%(default)s)")
    a("--device", choices=["cuda", "cpu"], default="cuda", help="plan a GPU run (bf16 compute) or a "
      "CPU run (fp32) (%(default)s)")
    a("--params", help="regex of the sampled parameters, as rtllm sample --params (default: all)")
    a("--ray-per", choices=["model", "group", "tensor"], default="model", help="as rtllm sample (%(default)s)")
    a("--prior-center", choices=["zero", "start"], help="plan a Gaussian prior with this center "
      "(default: no prior)")
    a("--dt", default="auto", help="'auto' (as rtllm sample: its trials hold a device copy of x and v) "
      "or a number (%(default)s)")
    a("--undo", choices=["auto", "yes", "no"], default="auto", help="the copy of x and v that undoes a "
      "rejected step: 'auto' takes it, as rtllm sample does, when free memory exceeds twice its size")
    a("--activation-checkpoint-every", type=int, default=1, help="activation checkpointing of every k-th "
      "block, as `rtllm sample --activation-checkpoint-every` (%(default)s)")
    a("--sample-dtype", choices=["compute", "fp32"], default="compute", help="as rtllm sample (%(default)s)")


def cmd_plan(args: argparse.Namespace) -> int:
    from rtllm.presets import config_for

    if args.dt != "auto":
        try:
            float(args.dt)
        except ValueError:
            raise ValueError(f"--dt must be 'auto' or a number, got {args.dt!r}") from None
    config = config_for(args.model)
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    shape = model_shape(config, params=args.params, ray_per=args.ray_per, name=args.model)
    kwargs = dict(batch=args.batch, seq=args.seq or context, device=args.device,
                  micro_batch=args.micro_batch, prior_center=args.prior_center,
                  gpu_mem_bytes=args.gpu_mem, checkpoint_every=args.activation_checkpoint_every,
                  dt_auto=args.dt == "auto", sample_dtype=args.sample_dtype,
                  undo_backup={"auto": "auto", "yes": True, "no": False}[args.undo])
    plans = plan_all_layouts(shape, **kwargs)
    main = next(p for p in plans if p.layout == args.layout)
    hints = fit_hints(shape, main, {**kwargs, "layout": args.layout})
    print(format_plan(plans, args.gpu_mem, chosen=args.layout, hints=hints))
    return 0
