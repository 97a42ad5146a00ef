"""Benchmark: sampling throughput and peak memory of a full step (forward, backward, sampler).

    python scripts/bench_sample.py                       # CPU: tiny demo-size GPT-2 and GPT-2 124M
    python scripts/bench_sample.py --models gpt2 --batch 4 --seq 256
    python scripts/bench_sample.py --json out/bench_sample.json

Models are built from their configs with random weights (no download). Each model runs in its
own subprocess so that its peak memory (RSS on CPU, max allocated on CUDA) is its own. Reports
tokens/s of whole steps and the share of the step spent outside forward/backward (the sampler's
reduce/update passes and the rest of the loop). Prints markdown.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {
    # the demo's pretrained model (rtllm.pretrain defaults), random weights
    "tiny": dict(vocab_size=2048, n_positions=128, n_embd=128, n_layer=4, n_head=4),
    "gpt2": dict(),  # GPT-2 124M
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
}


def measure(preset: str, batch: int, seq: int, steps: int, device: str) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import rtllm
    from rtllm.loss import lm_loss
    from rtllm.model_io import prepare_for_sampling
    from rtllm.runlog import peak_memory_bytes

    dev = torch.device(device)
    torch.manual_seed(0)
    config = GPT2Config(**PRESETS[preset])
    seq = min(seq, config.n_positions)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = prepare_for_sampling(GPT2LMHeadModel(config).to(dev, dtype))
    n_params = sum(p.numel() for p in model.parameters())
    sampler = rtllm.RayTracer(model.parameters(), dt=1e-6, loss_tolerance=0.05, ray="model")
    ids = torch.randint(config.vocab_size, (batch, seq + 1), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    fb = total = 0.0
    for i in range(steps + 1):  # the first step warms up and is not timed
        sync()
        t0 = time.perf_counter()
        sampler.zero_grad()
        lm_loss(model, ids[:, :-1], ids[:, 1:]).backward()
        sync()
        t1 = time.perf_counter()
        sampler.step()
        sync()
        t2 = time.perf_counter()
        if i:
            fb += t1 - t0
            total += t2 - t0
    return dict(model=preset, params=n_params, batch=batch, seq=seq, device=device,
                step_s=total / steps, tokens_per_s=batch * seq * steps / total,
                outside_fwd_bwd=(total - fb) / total, peak_bytes=peak_memory_bytes(dev))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "gpt2"], choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    args = ap.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.seq, args.steps, device)))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# bench_sample: {name}, torch {torch.__version__}, commit {commit}, {time.strftime('%Y-%m-%d')}\n")
    print("| model | params | batch x seq | step s | tokens/s | outside fwd+bwd | peak memory GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for preset in args.models:
        out = subprocess.run([sys.executable, __file__, "--one", preset, "--batch", str(args.batch),
                              "--seq", str(args.seq), "--steps", str(args.steps), "--device", device],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"| {preset} | {row['params'] / 1e6:.1f}M | {row['batch']} x {row['seq']} | {row['step_s']:.3f} | "
              f"{row['tokens_per_s']:.0f} | {100 * row['outside_fwd_bwd']:.1f}% | "
              f"{row['peak_bytes'] / 2**30:.2f} |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(device=name, commit=commit, rows=rows), indent=2))


if __name__ == "__main__":
    main()
