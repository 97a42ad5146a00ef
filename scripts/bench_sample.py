"""Benchmark: sampling throughput and peak memory of a full step (forward, backward, sampler).

    python scripts/bench_sample.py                       # CPU: tiny demo-size GPT-2 and GPT-2 124M
    python scripts/bench_sample.py --models gpt2 --batch 4 --seq 256
    python scripts/bench_sample.py --json out/bench_sample.json
    python scripts/bench_sample.py --models gpt2 --attn sdpa eager     # one row per variant
    python scripts/bench_sample.py --models gpt2 --loss chunked naive --checkpoint-every 1 2 0

Models are built from their configs with random weights (no download). Each model runs in its
own subprocess so that its peak memory (RSS on CPU, max allocated on CUDA) is its own. Reports
tokens/s of whole steps and the share of the step spent outside forward/backward (the sampler's
reduce/update passes and the rest of the loop). Prints markdown.

Variants (every combination of the listed values is measured, each in its own subprocess):
--attn (transformers attention implementation; sdpa is transformers 5's default for GPT-2),
--loss (chunked: rtllm.lm.loss.lm_loss, the fused head + cross-entropy; naive: full logits then
F.cross_entropy), --checkpoint-every (k: activation checkpointing on every k-th block; 0: off).
--rounds R repeats the whole list R times in alternating order, so slow drift of a shared
machine hits every variant alike. On a shared CPU, wall time follows the other processes; the
"fwd+bwd CPU s" column (process CPU time, best with --threads 1) follows only the work done.
"fwd+bwd alloc MiB": the peak bytes one extra forward+backward allocates above what was resident
(CPU: rtllm.plan.memtrace's allocator trace; CUDA: max_memory_allocated), exact where RSS is coarse.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {
    # the demo's pretrained model (rtllm.lm.pretrain defaults), random weights
    "tiny": dict(vocab_size=2048, n_positions=128, n_embd=128, n_layer=4, n_head=4),
    "gpt2": dict(),  # GPT-2 124M
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
}


def measure(preset: str, batch: int, seq: int, steps: int, device: str, attn: str = "sdpa",
            loss: str = "chunked", checkpoint_every: int = 1) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import rtllm
    from rtllm.lm.loss import lm_loss, naive_lm_loss
    from rtllm.lm.model_io import prepare_for_sampling
    from rtllm.store.runlog import peak_memory_bytes

    dev = torch.device(device)
    torch.manual_seed(0)
    config = GPT2Config(**PRESETS[preset], attn_implementation=attn)
    seq = min(seq, config.n_positions)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = prepare_for_sampling(GPT2LMHeadModel(config).to(dev, dtype),
                                 checkpointing=checkpoint_every > 0,
                                 checkpoint_every=max(checkpoint_every, 1))
    assert model.config._attn_implementation == attn
    loss_fn = lm_loss if loss == "chunked" else naive_lm_loss
    n_params = sum(p.numel() for p in model.parameters())
    sampler = rtllm.RayTracer(model.parameters(), dt=1e-6, loss_tolerance=0.05, ray="model")
    ids = torch.randint(config.vocab_size, (batch, seq + 1), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    fb = total = fb_cpu = 0.0
    for i in range(steps + 1):  # the first step warms up and is not timed
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        sampler.zero_grad()
        loss_fn(model, ids[:, :-1], ids[:, 1:]).backward()
        sync()
        t1, c1 = time.perf_counter(), time.process_time()
        sampler.step()
        sync()
        t2 = time.perf_counter()
        if i:
            fb += t1 - t0
            fb_cpu += c1 - c0
            total += t2 - t0
    def fwd_bwd():
        sampler.zero_grad()
        loss_fn(model, ids[:, :-1], ids[:, 1:]).backward()

    # Bytes allocated by one forward+backward above what was resident (untimed: the CPU
    # profiler that counts them slows the step down).
    if dev.type == "cuda":
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        sync()
        fwd_bwd_alloc = torch.cuda.max_memory_allocated() - base
    else:
        from rtllm.plan.memtrace import allocator_peak_bytes

        fwd_bwd_alloc = allocator_peak_bytes(fwd_bwd)[0]
    return dict(model=preset, params=n_params, batch=batch, seq=seq, device=device, attn=attn,
                fwd_bwd_alloc_bytes=fwd_bwd_alloc,
                loss=loss, checkpoint_every=checkpoint_every, fwd_bwd_s=fb / steps,
                fwd_bwd_cpu_s=fb_cpu / steps, threads=torch.get_num_threads(),
                step_s=total / steps, tokens_per_s=batch * seq * steps / total,
                outside_fwd_bwd=(total - fb) / total, peak_bytes=peak_memory_bytes(dev))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "gpt2"], choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--attn", nargs="+", default=["sdpa"], choices=["sdpa", "eager"])
    ap.add_argument("--loss", nargs="+", default=["chunked"], choices=["chunked", "naive"])
    ap.add_argument("--checkpoint-every", nargs="+", type=int, default=[1],
                    help="checkpoint every k-th block (1: all, 0: none)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    args = ap.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(k < 0 for k in args.checkpoint_every) or args.rounds < 1:
        ap.error("--checkpoint-every needs values >= 0 and --rounds a value >= 1")
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.seq, args.steps, device, args.attn[0],
                                 args.loss[0], args.checkpoint_every[0])))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# bench_sample: {name}, torch {torch.__version__}, commit {commit}, {time.strftime('%Y-%m-%d')}\n")
    print("| model | params | attn | loss | ckpt every | batch x seq | step s | fwd+bwd s | fwd+bwd CPU s | "
          "tokens/s | outside fwd+bwd | peak memory GiB | fwd+bwd alloc MiB |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    variants = list(itertools.product(args.models, args.attn, args.loss, args.checkpoint_every))
    rows = []
    for r in range(args.rounds):
        for preset, attn, loss, every in (variants if r % 2 == 0 else variants[::-1]):
            out = subprocess.run([sys.executable, __file__, "--one", preset, "--batch", str(args.batch),
                                  "--seq", str(args.seq), "--steps", str(args.steps), "--device", device,
                                  "--attn", attn, "--loss", loss, "--checkpoint-every", str(every),
                                  *(["--threads", str(args.threads)] if args.threads else [])],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"| {preset} | {row['params'] / 1e6:.1f}M | {attn} | {loss} | {every or 'off'} | "
                  f"{row['batch']} x {row['seq']} | {row['step_s']:.3f} | {row['fwd_bwd_s']:.3f} | "
                  f"{row['fwd_bwd_cpu_s']:.3f} | "
                  f"{row['tokens_per_s']:.0f} | {100 * row['outside_fwd_bwd']:.1f}% | "
                  f"{row['peak_bytes'] / 2**30:.2f} | {row['fwd_bwd_alloc_bytes'] / 2**20:.0f} |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(device=name, commit=commit, rows=rows), indent=2))


if __name__ == "__main__":
    main()
