"""The sampling run: config, the loop, dt auto, checkpoints, chains, MILE.

`config` (SampleConfig, MemberTraining, chain seeds) -> `sampling` (SamplingRun: model, data,
sampler and sample writer; the loop, undo, checkpoints) with `sampler_setup` (which sampler,
MCLMC tuning in the burn-in), `dt_auto` (the step-size trials), `checkpoint` and `micro_batch`
(the largest micro-batch that fits, backing off on out-of-memory errors); `chains` runs
one chain per process under torchrun and `merge` lists every chain's samples in one ensemble;
`members` and `mile` are MILE's deep-ensemble members and their MCLMC chains.

May import: rtllm.samplers, rtllm.lm, rtllm.store, rtllm.state, rtllm.kernels.
"""
