"""One chain over W FSDP2 ranks (gloo, CPU) is bit-identical to the one-process chain.

The torchrun runs take ~35 s (W=2) and ~40 s (W=3) on the loaded 2-core machine; each is
compared with the same chains on this process (tests/state/sharded_chain.py).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rtllm.samplers.optimizers import RayTracer
from rtllm.state.sharded import ShardedState

sys.path.insert(0, str(Path(__file__).parent))
from sharded_chain import SAMPLERS, run_chain  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
WORKER = Path(__file__).parent / "sharded_chain.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(world: int, model_dir: Path, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(WORKER),
           str(model_dir), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_chains_equal_the_one_process_chains_bit_for_bit(world, tiny_model_dir, tmp_path):
    sharded = _torchrun(world, tiny_model_dir, tmp_path / "sharded.pt")
    start = run_chain("ray", str(tiny_model_dir), world, steps=0)
    for name in SAMPLERS:
        alone = run_chain(name, str(tiny_model_dir), world)
        assert sharded[name].keys() - alone.keys() <= {"skipped_steps_per_rank"}
        for key, value in alone.items():
            assert torch.equal(sharded[name][key], value), f"{name}: {key} differs"
        assert any(not torch.equal(value, start[key]) for key, value in alone.items()), name
    # a NaN gradient on one rank only: every rank skipped that step
    assert sharded["ray"]["skipped_steps_per_rank"].tolist() == [1] * world


def test_one_process_sharded_state_works_in_place_with_the_fast_sums(tiny_model_dir):
    from transformers import GPT2LMHeadModel

    from rtllm.lm.loss import naive_lm_loss

    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    params = list(model.parameters())
    sampler = RayTracer(params, dt=1e-3, seed=3, sharded=ShardedState())
    # the position is the parameters' own storage, and gradients land in the buffer
    assert all(s.x.data_ptr() == p.data_ptr() for s, p in zip(sampler.shards, params))
    ids = torch.randint(model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    naive_lm_loss(model, ids[:, :-1], ids[:, 1:]).backward()
    assert all(p.grad.data_ptr() == s.g.data_ptr() for s, p in zip(sampler.shards, params))
    key = dict(seed=3, step=0, stream=1, noise=True)
    exact = sampler._reduce(key)
    sampler.sharded = None  # the fast pass (fp32 partials) over the same shards
    fast = sampler._reduce(key)
    # fp32 partial dots of <= 2^16 terms: relative error ~1e-6 (the backends' stated bound)
    np.testing.assert_allclose(exact, fast, rtol=1e-5, atol=1e-5 * np.abs(fast).max())


def test_non_finite_gradient_gives_nan_gradient_sums_and_a_skipped_step(tiny_model_dir):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    sampler = RayTracer(list(model.parameters()), dt=1e-3, seed=3, sharded=ShardedState())
    before = [s.x.clone() for s in sampler.shards]
    sampler.shards[2].g[4] = float("nan")
    sums = sampler.sharded.ray_sums(sampler._flat, [0], 1, sampler.backend,
                                    dict(seed=3, step=0, stream=1, noise=True))
    assert np.isnan(sums[0, [1, 2, 5]]).all() and np.isfinite(sums[0, [0, 3, 4]]).all()
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        sampler.step()
    assert sampler.skipped_steps == 1
    assert all(torch.equal(s.x, b) for s, b in zip(sampler.shards, before))


def test_settings_it_cannot_shard_fail_with_one_line(tiny_model_dir):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="layout 'fp32' only"):
        RayTracer(list(model.parameters()), dt=1e-3, layout="fp32-split", sharded=ShardedState())
