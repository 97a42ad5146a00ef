"""rtllm: posterior samples of language-model weights with the ray tracing sampler."""
from rtllm.samplers import HMC, SGLD, RayTracer
from rtllm.trajectory import TrajectoryResult, sample_trajectories

__all__ = ["RayTracer", "HMC", "SGLD", "sample_trajectories", "TrajectoryResult"]
