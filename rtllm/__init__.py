"""rtllm: posterior samples of language-model weights with the ray tracing sampler."""
from rtllm.mclmc import MCLMC
from rtllm.mclmc_tune import TuneInfo, tune_mclmc
from rtllm.samplers import HMC, SGLD, RayTracer
from rtllm.trajectory import (MCLMCChains, MCLMCResult, TrajectoryResult, sample_mclmc,
                              sample_trajectories)

# The LLM side imports transformers; load it on first use so `import rtllm` stays light.
_LAZY = {"SampleConfig": "rtllm.config", "sample": "rtllm.sampling", "Ensemble": "rtllm.ensemble",
         "load_sample": "rtllm.ensemble", "evaluate": "rtllm.evaluation"}

__all__ = ["RayTracer", "HMC", "SGLD", "MCLMC", "tune_mclmc", "TuneInfo", "MCLMCChains",
           "MCLMCResult", "sample_mclmc", "sample_trajectories", "TrajectoryResult", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rtllm' has no attribute {name!r}")
