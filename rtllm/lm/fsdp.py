"""FSDP2 for one sharded chain: every transformer block its own unit, gradients summed in float64.

`shard_model` applies `torch.distributed.fsdp.fully_shard` to each block of a Hugging Face model
(the classes in its `_no_split_modules`) and then to the root, so one block's weights are
all-gathered at a time. Gradients are reduce-scattered as a float64 SUM (no division): each rank
scales its loss by its share of the minibatch, so the reduced gradient is the float64 sum of the
per-rank gradients rounded once, which is the one-process micro-batch gradient accumulated in
float64 (rtllm.run.sampling with --shard-state), whatever the order the ranks are summed in as
long as that float64 sum is exact (docs/sharding.md).
"""
from __future__ import annotations

import torch
from torch import nn


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules whose class is one of the model's `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class "
                         f"(_no_split_modules); shard_model needs one FSDP unit per block")
    return blocks


def shard_model(model: nn.Module, mesh=None) -> nn.Module:
    """fully_shard each block and the root (in place); returns the model.

    mesh: a 1-D DeviceMesh (default: all ranks of the default process group on the model's
    device type).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(reduce_dtype=torch.float64)
    for block in block_modules(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum: each rank scales its own loss
    return model
