"""Peak bytes allocated on CPU while a function runs: what the memory planner is checked against.

`torch.cuda.max_memory_allocated` exists only on CUDA. On CPU the profiler records every
allocation and free of the CPU allocator (`profile_memory=True`), scratch memory inside single
ops included; their running sum from the call's start gives the same quantity.
"""
from __future__ import annotations


def allocator_peak_bytes(fn, *args, **kwargs) -> tuple[int, object]:
    """(peak bytes allocated above the level at the call, fn's result), from the profiler.

    Every allocation of the CPU allocator counts, scratch memory inside an op included: the
    CPU counterpart of `torch.cuda.max_memory_allocated() - memory_allocated()` before the call.
    """
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, result
