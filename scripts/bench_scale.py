"""Benchmark: a real-size model built on the meta device, materialized into the sampler's flat
buffers, and a few real sampler steps; construction time, peak memory and step time.

    python scripts/bench_scale.py --model gpt2-xl --device cpu --steps 2 --seq-len 128
    python scripts/bench_scale.py --model gpt2 --json out/scale_gpt2.json
    python scripts/bench_scale.py --model path/to/hf-model-dir      # its config.json, random init

The model (a preset, or the config of a local model directory) gets random weights from its
config (transformers' own init, run in place on views of the fp32 position buffer), so no
full-size copy of the weights ever exists next to the sampler's x, v and g. Each step is
zero_grad, forward + backward of the chunked cross-entropy on random tokens (activation
checkpointing on), and one RayTracer step. Memory on CPU: the process's peak resident set
(VmHWM; ru_maxrss agrees) overall and per phase (the peak is reset between phases through
/proc/self/clear_refs where the kernel allows it); on CUDA: torch's peak allocated bytes.
Prints a markdown table; --json writes every figure (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

GIB = 2**30
# Asked for on top of the buffers before a run starts (MemAvailable, measured after the imports):
# the peak went 0.9, 1.0 and 1.46 GiB above buffers + that RSS at GPT-2 124M, 355M and 1.5B
# (activations, the [vocab, d] gradient temporaries, heap the allocator keeps).
_HEADROOM = int(1.5 * GIB)


def _status_kib(field: str) -> int:
    """A VmXXX field of /proc/self/status in KiB (0 where there is no procfs)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs '5'); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _available_bytes() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) * 1024 if match else None


class Phases:
    """Wall time and peak memory of named phases, in order."""

    def __init__(self, device) -> None:
        import torch

        self.torch, self.device = torch, device
        self.rows: dict[str, dict] = {}
        self.per_phase_peaks = device.type == "cuda" or _reset_peak()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def run(self, name: str, fn):
        self._sync()
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)
            start = self.torch.cuda.memory_allocated(self.device)
        else:
            _reset_peak()
            # Includes heap the allocator kept from earlier phases: the peak's own baseline.
            start = _status_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        out = fn()
        self._sync()
        seconds = time.perf_counter() - t0
        if self.device.type == "cuda":
            peak = self.torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.rows[name] = dict(seconds=seconds, start_bytes=start, peak_bytes=peak)
        return out


def measure(model_name: str, *, device: str = "cpu", steps: int = 2, seq_len: int = 128,
            batch: int = 1, ray_per: str = "model", dt: float = 5e-6, seed: int = 0,
            memory_check: bool = True) -> dict:
    """Build, materialize and step the model; return every figure as a dict."""
    import torch

    import rtllm
    from rtllm.lm.loss import lm_loss
    from rtllm.lm.model_io import (config_initializer, meta_model, param_groups_for,
                                prepare_for_sampling, resolve_device, select_parameters)
    from rtllm.lm.presets import config_for

    if steps < 1 or seq_len < 1 or batch < 1:
        raise ValueError(f"--steps, --seq-len and --batch must be >= 1, got {steps}, {seq_len}, {batch}")
    dev = resolve_device(device)
    config = config_for(model_name)
    if seq_len > config.n_positions:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context of {config.n_positions}")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    baseline_rss = _status_kib("VmRSS") * 1024
    phases = Phases(dev)

    model = phases.run("build on meta", lambda: prepare_for_sampling(meta_model(config, dtype=dtype)))
    n_params = sum(p.numel() for p in model.parameters())
    # fp32 x and v, the gradient in the compute dtype, and a compute copy unless that is x.
    expected = n_params * (8 + dtype.itemsize + (0 if dtype == torch.float32 else dtype.itemsize))
    available = _available_bytes() if dev.type == "cpu" else None
    if memory_check and available is not None and expected + _HEADROOM > available:
        raise SystemExit(f"{model_name} needs about {(expected + _HEADROOM) / GIB:.1f} GiB "
                         f"({expected / GIB:.1f} GiB of flat buffers + {_HEADROOM / GIB:.1f} "
                         f"GiB headroom) but only {available / GIB:.1f} GiB is available; free "
                         f"memory or pass --no-memory-check")

    sampled, _ = select_parameters(model, None)
    torch.manual_seed(seed)  # the init draws from the global generator
    sampler = phases.run("materialize + init", lambda: rtllm.RayTracer(
        param_groups_for(sampled, ray_per), dt=dt, loss_tolerance=0.05, seed=seed,
        ray="model" if ray_per == "model" else "group", device=dev,
        init_weights=config_initializer(model)))
    buffer_bytes = sum(t.numel() * t.element_size() for sh in sampler.shards
                       for t in (sh.x, sh.v, sh.g, sh.compute, getattr(sh, "x_lo", None))
                       if t is not None)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if getattr(config, "tie_word_embeddings", False) and not tied:
        raise RuntimeError("materialization untied the input and output embeddings")
    ids = torch.randint(config.vocab_size, (batch, seq_len + 1),
                        generator=torch.Generator().manual_seed(seed)).to(dev)
    losses = []

    def forward_backward():
        sampler.zero_grad()
        loss = lm_loss(model, ids[:, :-1], ids[:, 1:])
        loss.backward()
        losses.append(float(loss.detach()))

    for i in range(steps):
        phases.run(f"step {i + 1} fwd+bwd", forward_backward)
        phases.run(f"step {i + 1} sampler", sampler.step)
    fb = [phases.rows[f"step {i + 1} fwd+bwd"]["seconds"] for i in range(steps)]
    st = [phases.rows[f"step {i + 1} sampler"]["seconds"] for i in range(steps)]
    peak = max(r["peak_bytes"] for r in phases.rows.values())
    ru_maxrss = None
    if dev.type == "cpu":
        # Linux resets ru_maxrss together with VmHWM, so with per-phase peaks this is the last
        # phase's; without them it is the whole run's, a cross-check of VmHWM.
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ru_maxrss = ru if sys.platform == "darwin" else ru * 1024
    return dict(
        model=model_name, params=n_params, device=str(dev), dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(), batch=batch, seq_len=seq_len, steps=steps, ray_per=ray_per,
        backend=sampler.backend.name, shards=len(sampler.shards), buffer_bytes=buffer_bytes,
        baseline_rss_bytes=baseline_rss, peak_bytes=peak, ru_maxrss_end_bytes=ru_maxrss,
        per_phase_peaks=phases.per_phase_peaks, phases=phases.rows, losses=losses,
        build_s=phases.rows["build on meta"]["seconds"],
        materialize_s=phases.rows["materialize + init"]["seconds"],
        fwd_bwd_s=sum(fb) / steps, sampler_step_s=sum(st) / steps,
        tokens_per_s=batch * seq_len * steps / (sum(fb) + sum(st)),
        skipped_steps=sampler.skipped_steps,
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )


def markdown(r: dict) -> str:
    lines = [f"{r['model']}: {r['params'] / 1e9:.3f}e9 parameters, {r['dtype']} on {r['device']} "
             f"({r['threads']} threads), backend {r['backend']}, {r['shards']} shard(s), "
             f"batch {r['batch']} x seq {r['seq_len']}; flat buffers {r['buffer_bytes'] / GIB:.2f} GiB, "
             f"RSS before build {r['baseline_rss_bytes'] / GIB:.2f} GiB",
             "", "| phase | seconds | memory at start GiB | peak memory GiB |", "|---|---:|---:|---:|"]
    for name, row in r["phases"].items():
        lines.append(f"| {name} | {row['seconds']:.2f} | {row['start_bytes'] / GIB:.2f} | "
                     f"{row['peak_bytes'] / GIB:.2f} |")
    lines += ["", f"fwd+bwd {r['fwd_bwd_s']:.2f} s/step, sampler {r['sampler_step_s']:.2f} s/step, "
                  f"{r['tokens_per_s']:.1f} tokens/s; peak {r['peak_bytes'] / GIB:.2f} GiB"
                  + (f" (ru_maxrss at the end {r['ru_maxrss_end_bytes'] / GIB:.2f} GiB)"
                     if r["ru_maxrss_end_bytes"] else "")
                  + f", {(r['peak_bytes'] - r['buffer_bytes']) / GIB:.2f} GiB above the buffers; "
                  f"losses {', '.join(f'{x:.4f}' for x in r['losses'])}; 1-min load average at the end "
                  f"{r['load_average']}"]
    if not r["per_phase_peaks"]:
        lines.append("(per-phase peaks not available: each is the running peak)")
    return "\n".join(lines)


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a "
                    "local model directory (only its config.json is read)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ray-per", choices=["model", "group", "tensor"], default="model")
    ap.add_argument("--dt", type=float, default=5e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory-check", action="store_true",
                    help="start even when MemAvailable looks too small for the flat buffers")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    try:
        result = measure(args.model, device=args.device, steps=args.steps, seq_len=args.seq_len,
                         batch=args.batch, ray_per=args.ray_per, dt=args.dt, seed=args.seed,
                         memory_check=not args.no_memory_check)
    except ValueError as err:
        raise SystemExit(f"bench_scale: {err}") from None
    print(markdown(result), flush=True)
    if args.json:
        _write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    main()
