"""The memory plan: bytes per component and phase of a sampling run, before it runs.

`memory` sizes every buffer exactly as the sampler allocates it (from the model's config on
the meta device) and takes the peak over the phases of a step; `activations` models GPT-2's
activations with checkpointing; `format` prints the table and the fits line; `memtrace` traces
CPU allocations to check the plan.

May import: rtllm.store, rtllm.samplers, rtllm.lm, rtllm.state, rtllm.kernels.
"""
