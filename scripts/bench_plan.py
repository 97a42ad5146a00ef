"""The memory planner against measurements on CPU, and its predictions for GPT-2 on a GPU.

    python scripts/bench_plan.py            # prints markdown tables (docs/benchmarks.md)

1. Activations: the planner's forward+backward peak against the peak of bytes allocated during
   one forward+backward of random GPT-2s (profiler allocation events: scratch inside ops too),
   the sampler's buffers already allocated, as in a run.
2. A whole CPU run (model construction, sampler, two steps) against the plan's peak allocated,
   and the construction alone.
3. Predictions (not measurements) for the four GPT-2 sizes on a CUDA GPU, bf16 compute.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from rtllm import RayTracer
from rtllm.lm.loss import lm_loss
from rtllm.plan.memtrace import allocator_peak_bytes
from rtllm.lm.model_io import prepare_for_sampling
from rtllm.plan.memory import BUILD, FWD_BWD, GIB, GRAD_ACC, SAMPLE_BUFFERS, STEP, model_shape, plan_memory
from rtllm.lm.presets import PRESETS, preset_config

MIB = 2**20
# (n_embd, n_layer, n_head, vocab, batch, seq, checkpoint_every, dtype)
CASES = [
    (128, 4, 4, 384, 2, 256, 1, torch.float32),
    (128, 4, 4, 50257, 2, 256, 1, torch.float32),
    (256, 2, 8, 5000, 4, 64, 1, torch.float32),
    (128, 4, 4, 384, 2, 256, 2, torch.float32),
    (768, 2, 12, 50257, 1, 64, 1, torch.float32),
    (128, 4, 4, 384, 2, 256, 1, torch.bfloat16),
    (128, 4, 4, 50257, 2, 256, 1, torch.bfloat16),
]


def _model(config, dtype, every):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(dtype)
    prepare_for_sampling(model, checkpoint_every=every)
    return model


def activations_table() -> None:
    print("| n_embd | layers | vocab | batch x seq | ckpt every | dtype | peak in | predicted MiB "
          "| measured MiB | predicted / measured |\n|---:|---:|---:|---|---:|---|---|---:|---:|---:|")
    for C, L, H, V, B, T, every, dtype in CASES:
        config = GPT2Config(n_embd=C, n_layer=L, n_head=H, vocab_size=V, n_positions=max(T, 64))
        model = _model(config, dtype, every)
        sampler = RayTracer(model.parameters(), dt=1e-3)
        ids = torch.randint(V, (B, T + 1))

        def forward_backward():
            sampler.zero_grad()
            lm_loss(model, ids[:, :-1], ids[:, 1:]).backward()

        forward_backward()
        measured, _ = allocator_peak_bytes(forward_backward)
        plan = plan_memory(config, batch=B, seq=T, device="cpu", compute_dtype=dtype, checkpoint_every=every)
        predicted = sum(plan.transients[FWD_BWD].values())
        print(f"| {C} | {L} | {V} | {B} x {T} | {every} | {str(dtype)[6:]} | {plan.activation_phase} | "
              f"{predicted / MIB:.2f} | {measured / MIB:.2f} | {predicted / measured:.3f} |")


def whole_run_table() -> None:
    print("\n| n_embd | layers | vocab | batch x seq | peak phase | predicted MiB | measured MiB "
          "| predicted / measured |\n|---:|---:|---:|---|---|---:|---:|---:|")
    for C, L, H, V, B, T, every, dtype in CASES[:3]:
        config = GPT2Config(n_embd=C, n_layer=L, n_head=H, vocab_size=V, n_positions=max(T, 64))
        ids = torch.randint(V, (B, T + 1))

        def run():
            model = _model(config, dtype, every)
            sampler = RayTracer(model.parameters(), dt=1e-3)
            for _ in range(2):
                sampler.zero_grad()
                lm_loss(model, ids[:, :-1], ids[:, 1:]).backward()
                sampler.step()

        measured, _ = allocator_peak_bytes(run)
        plan = plan_memory(config, batch=B, seq=T, device="cpu")
        # No sample writer and no checkpoint in this run: the phases it has.
        totals = {k: plan.phase_totals[k] - plan.persistent[SAMPLE_BUFFERS] for k in (BUILD, FWD_BWD, STEP)}
        phase = max(totals, key=totals.get)
        print(f"| {C} | {L} | {V} | {B} x {T} | {phase} | {totals[phase] / MIB:.2f} | "
              f"{measured / MIB:.2f} | {totals[phase] / measured:.3f} |")


def build_table() -> None:
    """The sampler's construction alone: the model's weights and the buffers they are copied into."""
    print("\n| dtype | parameters | predicted bytes | measured bytes |\n|---|---:|---:|---:|")
    config = GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=50257, n_positions=256)
    for dtype in (torch.float32, torch.bfloat16):
        def build():
            model = GPT2LMHeadModel(config).to(dtype)
            return RayTracer(model.parameters(), dt=1e-3)

        measured, sampler = allocator_peak_bytes(build)
        plan = plan_memory(config, batch=1, seq=64, device="cpu", compute_dtype=dtype)
        print(f"| {str(dtype)[6:]} | {sampler.num_params:,} | {plan.phase_totals[BUILD]:,} | {measured:,} |")


def gpu_predictions(gpu_mem: int) -> None:
    print(f"\nPredictions for a CUDA GPU of {gpu_mem / GIB:.0f} GiB, bf16 compute, fp32 layout "
          f"(`rtllm plan --model M --batch B --seq 1024`, fixed --dt unless stated):\n")
    print("| model | batch x seq | micro | dt auto | peak phase | activations GiB (fwd/bwd) | peak allocated GiB "
          "| total GiB | fits |\n|---|---|---:|---|---|---:|---:|---:|---|")
    for name in PRESETS:
        shape = model_shape(preset_config(name), name=name)
        rows = [(8, 8, False), (8, 8, True)] if name != "gpt2-xl" else \
            [(b, b, False) for b in (1, 2, 4, 8)] + [(8, 8, True), (8, 4, False), (8, 1, False)]
        for batch, micro, dt_auto in rows:
            plan = plan_memory(shape, batch=batch, seq=1024, micro_batch=micro, gpu_mem_bytes=gpu_mem,
                               dt_auto=dt_auto, undo_backup="auto")
            acts = sum(plan.transients[FWD_BWD].values()) - plan.transients[FWD_BWD][GRAD_ACC]
            print(f"| {name} | {batch} x 1024 | {micro} | {'yes' if dt_auto else 'no'} | {plan.peak_phase} | "
                  f"{acts / GIB:.2f} | {plan.peak_allocated / GIB:.2f} | {plan.total / GIB:.2f} | "
                  f"{'yes' if plan.fits else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-mem-gib", type=float, default=24.0)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    activations_table()
    whole_run_table()
    build_table()
    gpu_predictions(int(args.gpu_mem_gib * GIB))
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
