"""rtllm: posterior samples of language-model weights with the ray tracing sampler.

The public API is loaded on first use, so `import rtllm` (and the `rtllm` command's --help)
imports neither torch nor transformers. The package is laid out by role: docs/architecture.md.
"""
import importlib

_API = {
    # the sampler family (rtllm.samplers): torch optimizers over flat buffers, and their tuner
    "RayTracer": "rtllm.samplers.optimizers", "HMC": "rtllm.samplers.optimizers",
    "SGLD": "rtllm.samplers.optimizers", "MCLMC": "rtllm.samplers.mclmc", "SMILE": "rtllm.samplers.smile",
    "tune_mclmc": "rtllm.samplers.mclmc_tune", "TuneInfo": "rtllm.samplers.mclmc_tune",
    # the trajectory form with a Metropolis test, vectorized over chains
    "MCLMCChains": "rtllm.samplers.trajectory", "MCLMCResult": "rtllm.samplers.trajectory",
    "sample_mclmc": "rtllm.samplers.trajectory", "sample_trajectories": "rtllm.samplers.trajectory",
    "TrajectoryResult": "rtllm.samplers.trajectory",
    # walking on the fiber: the walk, its learned maps, the LM run
    "FiberWalk": "rtllm.samplers.fiber", "fit_pca_map": "rtllm.samplers.fiber_map",
    "fit_mlp_map": "rtllm.samplers.fiber_map", "FiberConfig": "rtllm.run.fiber_config", "fiber": "rtllm.run.fiber",
    # the LLM run, the stored ensemble and its evaluation
    "SampleConfig": "rtllm.run.config", "sample": "rtllm.run.sampling",
    "Ensemble": "rtllm.store.ensemble", "load_sample": "rtllm.store.ensemble",
    "evaluate": "rtllm.evaluation.streaming",
    "EnsembleForCausalLM": "rtllm.evaluation.ensemble_lm",
}

__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'rtllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
