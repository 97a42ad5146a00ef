"""The memory planner: its arithmetic by hand, its state components against a real sampler's
buffers byte for byte, and its activation estimate against measured allocations on CPU."""
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging
from torch.utils._python_dispatch import TorchDispatchMode

from rtllm import RayTracer
from rtllm.plan.activations import activation_peak
from rtllm.cli import main
from rtllm.state.layouts import DEFAULT_LAYOUT, LAYOUTS, get_layout
from rtllm.lm.loss import lm_loss
from rtllm.plan.memtrace import allocator_peak_bytes
from rtllm.lm.model_io import load_model_and_tokenizer, param_groups_for, prepare_for_sampling, select_parameters
from rtllm.plan.memory import (BUILD, CKPT_STAGING, DT_SNAPSHOT, FWD_BWD, GIB, GRADIENTS, HOST_BOUND, NOISE,
                               POSITION, PRIOR, SAMPLE_BUFFERS, SEGMENT_TABLES, STEP, VELOCITY, WEIGHTS,
                               kernel_partials_bytes, model_shape, plan_memory, segment_table_bytes)
from rtllm.plan.format import parse_size
from rtllm.store.writer import SampleWriter
from triton_cpu import triton_on_cpu

hf_logging.set_verbosity_error()


def gpt2(**kw):
    return GPT2Config(**{"n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 10, "n_positions": 4, **kw})


# -- arithmetic by hand -----------------------------------------------------------------------------
def test_layout_registry():
    assert DEFAULT_LAYOUT in LAYOUTS
    fp32 = get_layout("fp32")
    assert fp32.bytes_per_param(2) == {"position": 4, "velocity": 4, "gradient": 2, "compute copy": 2}
    assert fp32.bytes_per_param(4) == {"position": 4, "velocity": 4, "gradient": 4, "compute copy": 0}
    with pytest.raises(ValueError, match="registered layouts: fp32"):
        get_layout("bf16-pair")


def test_tiny_gpt2_by_hand():
    # wte 10*8 + wpe 4*8 + ln_1 16 + c_attn 8*24+24 + c_proj 8*8+8 + ln_2 16 + c_fc 8*32+32
    # + mlp.c_proj 32*8+8 + ln_f 16 = 1000 parameters (lm_head is tied to wte: not counted again)
    plan = plan_memory(gpt2(), batch=1, seq=4, device="cuda", gpu_mem_bytes=GIB, prior_center="start")
    assert (plan.num_params, plan.sampled_params) == (1000, 1000)
    c = plan.persistent
    assert (c[WEIGHTS], c[POSITION], c[VELOCITY], c[GRADIENTS], c[PRIOR]) == (2000, 4000, 4000, 2000, 2000)
    assert plan.transients[BUILD] == {"loaded weights (until copied)": 2000}
    # one shard of 1000 elements at offset 0: one 1024-element block of 6 fp32 partials and
    # their float64 copy; every CUDA allocation rounds up to 512 bytes (partials, their copy,
    # the shard's float64 sums, their stack)
    assert plan.transients[STEP]["kernel partials"] == 512 + 512 + 512 + 512
    # two pinned sample buffers of 1000 bf16 values, at their exact size (rtllm.store.pinned)
    assert plan.host[SAMPLE_BUFFERS] == 2 * 2000
    assert plan.host[CKPT_STAGING] == 4000 + 4000 + 2000  # x, v and the prior center
    assert plan.fits is True
    cpu = plan_memory(gpt2(), batch=1, seq=4, device="cpu")
    p = cpu.persistent
    assert (p[WEIGHTS], p[POSITION], p[GRADIENTS], p[NOISE], p[SAMPLE_BUFFERS]) == (0, 4000, 4000, 4000, 8000)
    assert cpu.fits is None  # no memory size given


def test_micro_batch_accumulator_only_for_low_precision_gradients():
    rows = lambda plan: plan.transients[FWD_BWD]["micro-batch grad accumulator"]
    assert rows(plan_memory(gpt2(), batch=4, seq=4, micro_batch=2)) == 4 * 1000  # fp32 sum of bf16
    assert rows(plan_memory(gpt2(), batch=4, seq=4)) == 0
    assert rows(plan_memory(gpt2(), batch=4, seq=4, micro_batch=2, device="cpu")) == 0


def test_activation_phases_by_hand():
    B, T, C, L, H = 2, 16, 8, 3, 2
    N, f32 = B * T, 4
    h, f = N * C * f32, N * 4 * C * f32
    # A large vocabulary: the loss forward peaks. Saved: the L+1 block boundaries, ln_f's output
    # and statistics, the targets (int64 copy, mask, clamped copy) and the log-sum-exp; then the
    # chunk's logits and logsumexp's exp(x - max) temporary.
    V = 5000
    peak = activation_peak(gpt2(n_embd=C, n_layer=L, n_head=H, vocab_size=V, n_positions=T),
                           batch=B, seq=T, itemsize=4, device="cpu")
    assert peak.phase == "loss forward"
    assert peak.total == (L + 1) * h + h + 2 * N * f32 + N * (8 + 1 + 8 + f32) + 2 * N * V * f32
    # A small one: the last block's backward peaks, inside gelu_new. Live: the L checkpointed
    # inputs, the incoming gradient, the tied LM head's gradient (held until the embedding's
    # arrives), the block's saved tensors (ln_1 out, qkv, attention out, h1, ln_2 out: 7h; the
    # MLP's fc out, 0.5x, tanh, 1 + tanh, gelu out: 5f; two LayerNorms' mean and rstd; the
    # attention's log-sum-exp) and the product rule's two gradients (2f).
    V = 10
    peak = activation_peak(gpt2(n_embd=C, n_layer=L, n_head=H, vocab_size=V, n_positions=T),
                           batch=B, seq=T, itemsize=4, device="cpu")
    assert peak.phase == f"backward of block {L - 1}"
    assert peak.total == L * h + h + V * C * f32 + 7 * h + 7 * f + 2 * 2 * N * f32 + B * H * T * 4


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("25769803776") == 25769803776
    assert parse_size("1.5 gib") == 3 * 2**29
    for bad in ("24XB", "", "GiB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="--batch must be an integer >= 1"):
        plan_memory(gpt2(), batch=0, seq=4)
    with pytest.raises(ValueError, match="exceeds the model's context of 4"):
        plan_memory(gpt2(), batch=1, seq=5)
    with pytest.raises(ValueError, match="must divide"):
        plan_memory(gpt2(), batch=4, seq=4, micro_batch=3)
    with pytest.raises(ValueError, match="unknown layout"):
        plan_memory(gpt2(), batch=1, seq=4, layout="nope")


# -- against a real sampler -------------------------------------------------------------------------
class _PartialBuffers(TorchDispatchMode):
    """Records the [blocks, 6] fp32 buffers the Triton reduce pass allocates (sizes) and the
    float64 copies it sums per shard (copies)."""

    def __init__(self):
        super().__init__()
        self.sizes, self.copies = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.empty.memory_format and out.dtype == torch.float32 \
                and out.dim() == 2 and out.shape[1] == 6:
            self.sizes.append(out.nbytes)
        if func is torch.ops.aten._to_copy.default and out.dtype == torch.float64 \
                and out.dim() == 2 and out.shape[1] == 6 and args[0].dtype == torch.float32:
            self.copies.append(out.nbytes)
        return out


@pytest.mark.parametrize("dtype, params, ray_per", [
    (torch.float32, None, "model"),
    (torch.bfloat16, r"\.h\.|ln_f", "group"),  # frozen embeddings, one shard per block group
])
def test_state_components_equal_the_samplers_buffers(tiny_model_dir, tmp_path, dtype, params, ray_per):
    model, _ = load_model_and_tokenizer(tiny_model_dir, dtype=dtype)
    plan = plan_memory(model.config, batch=2, seq=16, device="cpu", compute_dtype=dtype,
                       prior_center="start", sampled_params=params, ray_per=ray_per)
    sampled, frozen = select_parameters(model, params)
    sampler = RayTracer(param_groups_for(sampled, ray_per), dt=1e-3, prior_scale=1.0,
                        prior_center="start", ray="model" if ray_per == "model" else "group")
    shards = sampler.shards
    assert [(s.numel, s.offset) for s in shards] == list(model_shape(model.config, params=params,
                                                                     ray_per=ray_per).shards)
    frozen_bytes = sum(p.nbytes for n, p in model.named_parameters() if n in frozen)
    buffers = sum(b.nbytes for b in model.buffers())
    p = plan.persistent
    assert p[POSITION] == sum(s.x.nbytes for s in shards)
    assert p[VELOCITY] == sum(s.v.nbytes for s in shards)
    assert p[GRADIENTS] == sum(s.g.nbytes for s in shards)
    assert p[WEIGHTS] == sum(s.compute.nbytes for s in shards if s.compute is not None) + frozen_bytes + buffers
    assert p[PRIOR] == sum(c.nbytes for c in sampler.prior.state_dict()["centers"])
    sampler.zero_grad()
    ids = torch.randint(model.config.vocab_size, (2, 17))
    lm_loss(model, ids[:, :-1], ids[:, 1:]).backward()
    sampler.step()
    assert p[NOISE] == sum(buf.nbytes for _, buf in sampler.backend._noise.values())
    state = sampler.state_dict()  # what a checkpoint copies to the host (no undo backup here)
    copied = [t for key in ("position", "velocity") for group in state[key] for t in group]
    copied += [c for c in state["prior"]["centers"] if c is not None]
    assert plan.transients["checkpoint write / dt-trial snapshot"][CKPT_STAGING] == sum(t.nbytes for t in copied)
    with SampleWriter.from_model(tmp_path, model, sample_dtype=None, run_config={}) as writer:
        assert p[SAMPLE_BUFFERS] == 2 * writer._nbytes


@triton_on_cpu
def test_kernel_partials_equal_the_triton_reduce():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2(n_embd=6, n_layer=2, vocab_size=1101, n_positions=16))
    sampled, _ = select_parameters(model, None)
    sampler = RayTracer(param_groups_for(sampled, "group"), dt=1e-3, ray="group", backend="triton")
    shards = [(s.numel, s.offset) for s in sampler.shards]
    assert any(off % 4 for _, off in shards)  # blocks aligned to the global quad grid
    sampler.zero_grad()
    ids = torch.randint(model.config.vocab_size, (2, 17))
    lm_loss(model, ids[:, :-1], ids[:, 1:]).backward()
    with _PartialBuffers() as seen:
        sampler.step()
    assert len(seen.sizes) == len(seen.copies) == len({off % 4 for _, off in shards})  # a launch per kind
    assert max(a + b for a, b in zip(seen.sizes, seen.copies)) == kernel_partials_bytes(shards, "triton")
    # the segment tables the launches keep: every tensor of every kind, in 512-byte CUDA blocks
    tables = [t for _, seg in next(iter(sampler.backend.segments._tables.values()))
              for t in (seg.table, seg.blocks, seg.block_seg, seg.block_idx)]
    assert len(tables) == 4 * len({off % 4 for _, off in shards})
    assert segment_table_bytes(shards) == sum(-(-t.nbytes // 512) * 512 for t in tables)


def test_segment_tables_and_host_memory_at_gpt2_xl():
    """About 12 MB of segment tables on the GPU; on the host, the pinned sample buffers and one
    checkpoint slice: within 16 GiB (the dt-auto snapshot goes to disk)."""
    xl = model_shape(GPT2Config(n_embd=1600, n_layer=48, n_head=25), ray_per="tensor")
    D = xl.sampled
    plan = plan_memory(xl, batch=1, seq=64, device="cuda", dt_auto=True, undo_backup=True)
    assert 8 * D / 1024 <= plan.persistent[SEGMENT_TABLES] <= 8 * D / 1024 + 1024 * len(xl.shards)
    assert plan.host == {SAMPLE_BUFFERS: 2 * 2 * xl.sample_numel, CKPT_STAGING: 64 * 2**20}
    assert plan.disk == {DT_SNAPSHOT: 8 * D} and plan.host_total <= HOST_BOUND
    assert plan_memory(xl, batch=1, seq=64, device="cpu").persistent[SEGMENT_TABLES] == 0  # torch backend


def test_cli_states_the_host_memory(capsys):
    assert main(["plan", "--model", "gpt2", "--batch", "1", "--seq", "64"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^host memory \d+\.\d GiB \(the dt-auto snapshot goes to disk\): within 16 GiB", out, re.M)
    assert re.search(r"^disk .*\n +dt-auto snapshot \(x, v\) +\d", out, re.M)


# -- activations against measured allocations -------------------------------------------------------
def _measured_forward_backward(config, batch, seq):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    prepare_for_sampling(model)
    sampler = RayTracer(model.parameters(), dt=1e-3)  # gradients are views of its buffer
    ids = torch.randint(config.vocab_size, (batch, seq + 1))

    def forward_backward():
        sampler.zero_grad()
        lm_loss(model, ids[:, :-1], ids[:, 1:]).backward()

    forward_backward()  # first call: lazy initializations out of the way
    peak, _ = allocator_peak_bytes(forward_backward)
    return peak


@pytest.mark.parametrize("vocab, batch, seq, phase", [
    (384, 2, 256, "backward of block 3"),  # the blocks dominate
    (50257, 1, 64, "loss backward"),  # GPT-2's vocabulary: the chunked loss dominates
])
def test_activation_estimate_within_10_percent_of_measured(vocab, batch, seq, phase):
    # n_embd 128, 4 layers. Deterministic: no sampling error, only the model's (measured within
    # 0.5% on this machine, docs/benchmarks.md).
    config = GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=vocab, n_positions=256)
    plan = plan_memory(config, batch=batch, seq=seq, device="cpu")
    predicted = sum(plan.transients[FWD_BWD].values())
    measured = _measured_forward_backward(config, batch, seq)
    assert plan.activation_phase == phase
    assert abs(predicted / measured - 1) < 0.10, (predicted, measured)


def test_whole_cpu_run_within_10_percent_of_measured():
    """Model construction, sampler, forward+backward, one step: the measured peak of allocated
    bytes against the plan's peak over those phases (the CPU analogue of max_memory_allocated)."""
    config = GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=384, n_positions=256)
    ids = torch.randint(config.vocab_size, (2, 257))

    def run():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
        prepare_for_sampling(model)
        sampler = RayTracer(model.parameters(), dt=1e-3)
        for _ in range(2):
            sampler.zero_grad()
            lm_loss(model, ids[:, :-1], ids[:, 1:]).backward()
            sampler.step()

    measured, _ = allocator_peak_bytes(run)
    plan = plan_memory(config, batch=2, seq=256, device="cpu")
    predicted = max(plan.phase_totals[k] - plan.persistent[SAMPLE_BUFFERS] for k in (BUILD, FWD_BWD, STEP))
    assert abs(predicted / measured - 1) < 0.10, (predicted, measured)


# -- other architectures, the command ---------------------------------------------------------------
def test_unknown_architecture_counts_parameters_but_does_not_guess_activations():
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=50, max_position_embeddings=32)
    plan = plan_memory(config, batch=1, seq=8, gpu_mem_bytes=GIB)
    torch.manual_seed(0)
    real = LlamaForCausalLM(config)
    assert plan.num_params == sum(p.numel() for p in real.parameters())
    assert not plan.activations_known and plan.fits is None
    assert any("activation model knows gpt2" in note for note in plan.notes)
    from rtllm.plan.format import format_plan

    assert format_plan([plan]).splitlines()[-1].endswith("cannot tell (activations unknown)")


def test_cli_table_and_last_line(capsys):
    assert main(["plan", "--model", "gpt2", "--batch", "2", "--seq", "128", "--gpu-mem", "24GiB"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"total \d+\.\d GiB of 24\.0 GiB: (fits|does not fit)", out[-1])
    assert any(line.strip().startswith("position") for line in out)
    assert re.search(r"\bfp32\b", out[1])  # one column per registered layout


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt3"], "neither a preset"),
    (["--model", "gpt2", "--batch", "0"], "--batch must be an integer >= 1"),
    (["--model", "gpt2", "--dt", "fast"], "--dt must be 'auto' or a number"),
])
def test_cli_bad_input_one_line(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_unparsable_memory_size(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", "gpt2", "--gpu-mem", "lots"])
    assert exc.value.code == 2
    assert "cannot read 'lots' as a memory size" in capsys.readouterr().err


def test_split_layout_components_equal_the_samplers_buffers(tiny_model_dir):
    """fp32-split: no compute copy (the bf16 high plane is the weights), a bf16 saved start."""
    model, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.bfloat16)
    plan = plan_memory(model.config, batch=2, seq=16, device="cpu", layout="fp32-split",
                       prior_center="start")
    assert plan.compute_dtype == "bfloat16"  # the layout sets it, on CPU too
    sampled, _ = select_parameters(model, None)
    sampler = RayTracer(param_groups_for(sampled, "model"), dt=1e-3, prior_scale=1.0,
                        prior_center="start", layout="fp32-split")
    shards = sampler.shards
    p = plan.persistent
    assert all(s.compute is None for s in shards)
    assert p[POSITION] == sum(s.x.nbytes + s.x_lo.nbytes for s in shards)
    assert p[VELOCITY] == sum(s.v.nbytes for s in shards)
    assert p[GRADIENTS] == sum(s.g.nbytes for s in shards)
    assert p[WEIGHTS] == sum(b.nbytes for b in model.buffers())  # no separate compute copy
    assert p[PRIOR] == sum(c.nbytes for c in sampler.prior.state_dict()["centers"])
    # a checkpoint or a dt-trial snapshot writes the planes as they are: nothing new on the device
    state = [t for group in sampler.state_dict()["position"] for t in group]
    assert [(t["hi"].data_ptr(), t["lo"].data_ptr()) for t in state] == [(s.x.data_ptr(), s.x_lo.data_ptr())
                                                                        for s in shards]
    for layout in ("fp32-split", "fp32"):
        on_gpu = plan_memory(model.config, batch=2, seq=16, device="cuda", layout=layout)
        assert "checkpoint write / dt-trial snapshot" not in on_gpu.transients
    with pytest.raises(ValueError, match="needs bfloat16"):
        plan_memory(model.config, batch=2, seq=16, device="cpu", layout="fp32-split",
                    compute_dtype=torch.float32)


@pytest.mark.parametrize("precondition", [False, True])
def test_smile_components_equal_the_samplers_buffers(tiny_model_dir, precondition):
    """SMILE's step-start copy and pSMILE's preconditioner, byte-exact against a real sampler
    (every parameter-sized buffer it holds beyond MCLMC's), and in the checkpoint staging."""
    from rtllm import SMILE
    from rtllm.plan.memory import PRECOND, SMILE_START

    model, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32)
    plan = plan_memory(model.config, batch=2, seq=16, device="cpu", sampler="smile", precondition=precondition)
    ray = plan_memory(model.config, batch=2, seq=16, device="cpu")
    sampled, _ = select_parameters(model, None)
    sampler = SMILE(param_groups_for(sampled, "model"), step_size=0.01, precondition=precondition)
    state = sampler.state_dict()["smile"]
    assert plan.persistent[SMILE_START] == sum(t.nbytes for t in state["step_start"])
    pre = state["preconditioner"]
    held = 0 if pre is None else sum(t.nbytes for key in ("mean", "var", "p") for t in pre[key])
    assert plan.persistent[PRECOND] == held == (12 * plan.sampled_params if precondition else 0)
    assert ray.persistent[SMILE_START] == ray.persistent[PRECOND] == 0
    others = {k: v for k, v in plan.persistent.items() if k not in (SMILE_START, PRECOND)}
    assert others == {k: v for k, v in ray.persistent.items() if k not in (SMILE_START, PRECOND)}
    with pytest.raises(ValueError, match="needs sampler='smile'"):
        plan_memory(model.config, batch=2, seq=16, device="cpu", sampler="mclmc", precondition=True)
    with pytest.raises(ValueError, match="runs layout 'fp32' only"):
        plan_memory(model.config, batch=2, seq=16, device="cpu", sampler="smile", layout="fp32-split")
