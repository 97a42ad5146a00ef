"""The per-rank plan of a sharded chain: state divided by W, FSDP's buffers from the block sizes."""
import pytest
from transformers import GPT2Config
from transformers.utils import logging as hf_logging

from rtllm.cli import main
from rtllm.plan.memory import GRADIENTS, POSITION, VELOCITY, WEIGHTS, plan_memory
from rtllm.plan.sharded import ALL_GATHER, REDUCE_SCATTER, plan_sharded, unit_sizes

hf_logging.set_verbosity_error()
CONFIG = GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=50, n_positions=8)


def test_units_are_the_blocks_and_the_rest():
    block, root = unit_sizes(CONFIG)
    # a GPT-2 block: 2 LayerNorms (2*16*2), attention (16*48+48 + 16*16+16), MLP (16*64+64 + 64*16+16)
    assert block == 2 * 2 * 16 + (16 * 48 + 48) + (16 * 16 + 16) + (16 * 64 + 64) + (64 * 16 + 16)
    assert root == 50 * 16 + 8 * 16 + 2 * 16  # wte (tied head), wpe, ln_f


@pytest.mark.parametrize("world", [2, 3])
def test_state_is_divided_by_the_world_size_and_fsdp_buffers_are_added(world):
    one = plan_memory(CONFIG, batch=6 // world, seq=8, device="cuda")
    plan = plan_sharded(CONFIG, world_size=world, batch=6, seq=8, device="cuda", gpu_mem_bytes=2**30)
    for row in (WEIGHTS, POSITION, VELOCITY, GRADIENTS):
        assert plan.rows[row] == -(-one.persistent[row] // world)
    block, root = unit_sizes(CONFIG)
    assert plan.rows[ALL_GATHER] == 2 * (2 * block + root)  # bf16 on CUDA
    assert block > root  # here a block is the largest unit: its bf16 and float64 gradient
    assert plan.rows[REDUCE_SCATTER] == 10 * block + -(-8 * block // world)
    assert plan.fits is True and plan.batch_per_rank == 6 // world


def test_bad_world_size_or_batch_is_one_line(capsys):
    with pytest.raises(ValueError, match="must be a multiple of --world-size"):
        plan_sharded(CONFIG, world_size=4, batch=6, seq=8)
    with pytest.raises(ValueError, match="integer >= 1"):
        plan_sharded(CONFIG, world_size=0, batch=6, seq=8)


def test_cli_prints_the_per_rank_plan(capsys, tmp_path):
    CONFIG.save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--world-size", "2", "--batch", "4",
                 "--gpu-mem", "1GiB"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Per-rank memory plan:") and "2 ranks, 2 sequences per rank" in out[0]
    assert out[-1].startswith("total per rank") and out[-1].endswith(": fits")
