"""The sampler's state: flat buffers, state layouts, and the backends that update them.

`flat` packs a model's parameters into flat, sharded buffers (fp32 position and velocity,
gradient and compute copy; the parameters and their `.grad` are views into them); `layouts`
says how many bytes each buffer takes per parameter; `backends` runs the two passes of a step
(reduce, update) over the shards with the Triton kernels (CUDA), their torch references, or a
fast CPU path. `progress` (no torch) is the progress bar/lines every room above uses: the
lowest room holds it so that all of them may import it.

May import: rtllm.kernels, torch. Knows nothing of samplers, transformers, files or runs.
"""
