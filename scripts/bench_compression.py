"""Benchmark: compressed samples (delta8, nf4) against bf16 samples.

    python scripts/bench_compression.py --gpt2                       # synthetic GPT-2 124M
    python scripts/bench_compression.py --demo rtllm-demo            # the demo ensemble (rtllm demo)

1. --gpt2: a randomly initialised GPT-2 124M (rtllm.lm.presets) as the start, a sample at
   start + r * rms(tensor) * N(0, 1) per tensor (r = --offset-ratio, default: what the demo
   ensemble's samples show). Bytes per sample vs bf16, max / rms reconstruction error vs the
   bf16 rounding of the same weights, expansion time of one sample vs one forward pass.
2. --demo: the demo's samples rewritten as bf16, delta8 and nf4 ensembles (start: the demo's
   starting checkpoint); file bytes per sample, errors, and the BMA NLL of rtllm.evaluate on a
   held-out play for each.
Prints markdown.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

FORMATS = ("delta8", "nf4")


def errors(x: dict, y: dict) -> tuple[float, float]:
    worst, sq, n = 0.0, 0.0, 0
    for k in x:
        d = (y[k].double() - x[k].double())
        worst, sq, n = max(worst, d.abs().max().item()), sq + d.square().sum().item(), n + d.numel()
    return worst, math.sqrt(sq / n)


def bf16(state: dict) -> dict:
    return {k: v.bfloat16().float() if v.is_floating_point() else v for k, v in state.items()}


def offset_ratio(ensemble_dir: Path, model_dir: Path) -> float:
    """rms(x - x_start) / rms(x_start) over the floating tensors, median over samples."""
    from rtllm.store.ensemble import Ensemble
    from safetensors.torch import load_file

    ens = Ensemble(ensemble_dir, verify=False)
    start = load_file(model_dir / "model.safetensors")
    ratios = []
    for _, state in ens:
        num = sum((state[k].double() - start[k].double()).square().sum().item() for k in state)
        den = sum(start[k].double().square().sum().item() for k in state)
        ratios.append(math.sqrt(num / den))
    return sorted(ratios)[len(ratios) // 2]


def bench_gpt2(ratio: float) -> None:
    from transformers import GPT2LMHeadModel

    from rtllm.lm.presets import preset_config
    from rtllm.store.delta import DeltaCodec

    torch.manual_seed(0)
    model = GPT2LMHeadModel(preset_config("gpt2")).eval()
    start = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    n = sum(v.numel() for v in start.values())
    gen = torch.Generator().manual_seed(1)
    sample = {k: v + ratio * v.square().mean().sqrt() * torch.randn(v.shape, generator=gen)
              if v.is_floating_point() else v for k, v in start.items()}
    bf_max, bf_rms = errors(sample, bf16(sample))
    ids = torch.randint(0, 50257, (1, 256), generator=gen)
    with torch.inference_mode():
        model(ids)
        t0 = time.perf_counter()
        model(ids)
        forward_s = time.perf_counter() - t0
    print(f"GPT-2 124M (random init), {n / 1e6:.1f}M stored weights, offsets {ratio:.3g} x rms(tensor)\n")
    print("| format | bytes / sample | vs bf16 | max abs error | rms error | expand one sample | vs one forward (1 x 256 tokens) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| bf16 | {2 * n / 1e6:.1f} MB | 1.00x | {bf_max:.3g} | {bf_rms:.3g} | - | - |")
    for fmt in FORMATS:
        codec = DeltaCodec(fmt)
        stored, err = codec.encode(sample, start)
        nbytes = sum(t.numel() * t.element_size() for t in stored.values())
        codec.decode(stored, start)
        t0 = time.perf_counter()
        codec.decode(stored, start)
        expand_s = time.perf_counter() - t0
        print(f"| {fmt} (block {codec.block_size}) | {nbytes / 1e6:.1f} MB | {nbytes / (2 * n):.3f}x | "
              f"{err['max_abs_error']:.3g} ({err['max_abs_error'] / bf_max:.2f}x bf16) | "
              f"{err['rms_error']:.3g} ({err['rms_error'] / bf_rms:.2f}x bf16) | {expand_s:.2f} s | "
              f"{expand_s / forward_s:.2f}x ({forward_s:.2f} s) |")
    print(f"\nThe start is stored once per ensemble in its own dtype (fp32 here: {4 * n / 1e6:.0f} MB).")


def rewrite(src: Path, out: Path, model_dir: Path, fmt: str) -> None:
    """The samples of `src` as a new ensemble in `fmt` (bf16: plain safetensors in bf16)."""
    from transformers import AutoModelForCausalLM

    from rtllm.store.ensemble import Ensemble
    from rtllm.store.writer import SampleWriter, copy_tokenizer

    ens = Ensemble(src, verify=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    live = {k: v.detach() for k, v in model.state_dict().items()}
    kwargs = dict(sample_dtype=torch.bfloat16) if fmt == "bf16" else dict(sample_dtype=None, sample_format=fmt)
    with SampleWriter(out, model_config=model.config, named_tensors=live, run_config=ens.config,
                      **kwargs) as w:
        for entry, state in ens:
            for k, v in state.items():
                live[k].copy_(v)
            w.submit(index=entry["index"], chain=entry["chain"], step=entry["step"], loss=entry["loss"],
                     heldout_loss=entry["heldout_loss"], masked=entry["masked"])
    copy_tokenizer(model_dir, out)


def bench_demo(work: Path, text: Path, seq_len: int) -> None:
    from rtllm.evaluation.streaming import evaluate
    from rtllm.store.ensemble import Ensemble

    src, model_dir = work / "ensemble", work / "model"
    truth = {e["index"]: s for e, s in Ensemble(src, verify=False)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("fp32 (as sampled)", "bf16", *FORMATS):
            out = src if fmt.startswith("fp32") else Path(tmp) / fmt
            if out != src:
                rewrite(src, out, model_dir, fmt)
            ens = Ensemble(out)
            files = [out / e["path"] / e.get("file", "model.safetensors") for e in ens.entries]
            per_sample = sum(f.stat().st_size for f in files) / len(files)
            worst = rms = 0.0
            for e, state in ens:
                m, r = errors(truth[e["index"]], state)
                worst, rms = max(worst, m), max(rms, r)
            t0 = time.perf_counter()
            for i in ens.indices:
                ens.state_dict(i)
            read_s = (time.perf_counter() - t0) / len(ens)
            t0 = time.perf_counter()
            nll = evaluate(out, [text], seq_len=seq_len).summary["nll_bma"]
            rows.append((fmt, per_sample, worst, rms, nll, time.perf_counter() - t0, read_s))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (8, seq_len))
    with torch.inference_mode():
        model(ids)
        t0 = time.perf_counter()
        model(ids)
        forward_s = time.perf_counter() - t0
    base = rows[1]
    print(f"Demo ensemble {src} ({len(truth)} samples), BMA NLL on {text.name}; one forward of "
          f"8 x {seq_len} tokens: {forward_s * 1e3:.0f} ms\n")
    print("| samples | bytes / sample | vs bf16 | max abs error | rms error | BMA NLL | vs bf16 | "
          "read + expand one sample | vs one forward | evaluate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for fmt, size, worst, rms, nll, secs, read_s in rows:
        print(f"| {fmt} | {size / 1e3:.0f} kB | {size / base[1]:.3f}x | {worst:.3g} | {rms:.3g} | "
              f"{nll:.5f} | {nll - base[4]:+.1e} | {read_s * 1e3:.0f} ms | {read_s / forward_s:.2f}x | "
              f"{secs:.1f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpt2", action="store_true", help="the synthetic GPT-2 124M figures")
    ap.add_argument("--demo", type=Path, help="an `rtllm demo --out` directory")
    ap.add_argument("--text", type=Path, help="held-out text for the demo's NLL (default: the demo's held-out play)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per window for the NLL (%(default)s)")
    ap.add_argument("--offset-ratio", type=float, help="GPT-2 offsets, x rms(tensor) (default: the demo's, else 0.05)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ratio = args.offset_ratio
    if args.demo:
        from rtllm.lm.corpus import heldout_files

        ratio = ratio or offset_ratio(args.demo / "ensemble", args.demo / "model")
        print(f"demo samples' offset from the start: {ratio:.3g} x rms(start) (median over samples)\n")
        bench_demo(args.demo, args.text or heldout_files()[0], args.seq_len)
    if args.gpt2:
        bench_gpt2(ratio or 0.05)


if __name__ == "__main__":
    main()
