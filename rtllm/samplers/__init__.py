"""The sampler family: torch optimizers over flat buffers, and their float64 scalar rules.

A step is a reduce pass over the state (six sums per ray), a scalar rule in float64
(`rules`: the ray kick, HMC's kick, refreshes, MCLMC's ESH kick, composed over those sums), and
an update pass. `optimizers` holds RayTracer, HMC and SGLD; `mclmc` MCLMC and `mclmc_tune` its
tuner (MILE's phases); `trajectory` the log-density form with a Metropolis test, vectorized
over chains; `prior` the Gaussian prior; `autocorr` the integrated autocorrelation time.

May import: rtllm.state, rtllm.kernels, torch, numpy. Knows nothing of transformers, files or
runs: `import rtllm.samplers.optimizers` works without transformers installed.
"""
