"""Short chains of the four samplers on a tiny GPT-2, sharded over torchrun ranks or on one process.

Under torchrun (gloo, CPU) the model is FSDP2-sharded and each rank takes its share of every
minibatch; on one process the same minibatch is split the same way into micro-batches whose
gradients are summed in float64 (what FSDP's float64 reduce-scatter does). Either way the
samplers run on `ShardedState` (exact sums). Run as a script under torchrun:
`python -m torch.distributed.run --nproc-per-node W sharded_chain.py MODEL_DIR OUT.pt`; rank 0
saves {sampler: {parameter name: full tensor}}.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from rtllm.lm.fsdp import shard_model
from rtllm.lm.loss import naive_lm_loss
from rtllm.samplers.mclmc import MCLMC
from rtllm.samplers.optimizers import HMC, SGLD, RayTracer
from rtllm.state.sharded import ShardedState

BATCH, SEQ, STEPS = 6, 17, 4  # 6 sequences split evenly over 1, 2 or 3 ranks
SAMPLERS = {
    "ray": lambda params, sh: RayTracer(params, dt=3e-3, refresh_rate=0.5, seed=7, sharded=sh),
    "hmc": lambda params, sh: HMC(params, dt=2e-3, refresh_rate=0.5, seed=7, sharded=sh),
    "sgld": lambda params, sh: SGLD(params, dt=1e-3, seed=7, sharded=sh),
    "mclmc": lambda params, sh: MCLMC(params, step_size=0.05, L=0.5, seed=7, sharded=sh),
}


def run_chain(name: str, model_dir: str, split: int, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The final weights of a short chain; `split` micro-batches per minibatch (one per rank)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    distributed = dist.is_initialized()
    if distributed:
        shard_model(model)
    sampler = SAMPLERS[name](list(model.parameters()), ShardedState())
    data = torch.Generator().manual_seed(11)
    for _ in range(steps):
        batch = torch.randint(model.config.vocab_size, (BATCH, SEQ), generator=data)
        parts = batch.chunk(split)
        mine = [parts[dist.get_rank()]] if distributed else parts
        sampler.zero_grad()
        acc = [torch.zeros_like(s.g, dtype=torch.float64) for s in sampler.shards]
        for part in mine:
            loss = naive_lm_loss(model, part[:, :-1], part[:, 1:]) * (len(part) / len(batch))
            loss.backward()
            if not distributed:  # float64 sum of the micro-batch gradients, rounded once
                for a, s in zip(acc, sampler.shards):
                    a.add_(s.g)
                    s.g.zero_()
        if not distributed:
            for a, s in zip(acc, sampler.shards):
                s.g.copy_(a)
        sampler.step()
    weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).clone()
               for n, p in model.named_parameters()}
    if distributed and name == "ray":  # a NaN gradient on the last rank only: skipped everywhere
        sampler.zero_grad()
        if dist.get_rank() == dist.get_world_size() - 1:
            next(s for s in sampler.shards if s.numel).g[0] = float("nan")
        sampler.step()
        skipped = [None] * dist.get_world_size()
        dist.all_gather_object(skipped, sampler.skipped_steps)
        weights["skipped_steps_per_rank"] = torch.tensor(skipped)
    return weights


if __name__ == "__main__":
    model_dir, out = sys.argv[1], sys.argv[2]
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(SAMPLERS)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {n: run_chain(n, model_dir, dist.get_world_size()) for n in names}
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()
