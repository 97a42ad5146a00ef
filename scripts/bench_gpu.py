"""One-call GPU benchmark (issue 5): everything in one run, a markdown table on stdout and a JSON file.

    python scripts/bench_gpu.py --json bench_gpu.json     # a CUDA machine with >= 64 GB: a few minutes
    python scripts/bench_gpu.py --smoke --json smoke.json # CPU: tiny sizes, every path but the CUDA calls

1. kernels: GB/s of the reduce and update Triton kernels on 1.56e9 elements (GPT-2 XL) against a
   device copy of the same bytes, and the two passes against the 26 bytes/parameter floor at the
   measured copy bandwidth (scripts/bench_update.py's bench_kernels).
2. GPT-2 XL, built on the meta device and materialized by the sampler (fp32 position and velocity,
   bf16 gradient and compute copy): forward+backward tokens/s at 1, 2, 4, 8 x 1024 tokens, with
   activation checkpointing on every block (and without, where it fits); peak allocated and reserved
   memory next to rtllm.plan.memory's prediction; the sampler's share of the step and its time against the
   bandwidth floor; then again with the process limited to 24 GiB, as on a consumer card.
3. offload: the extra time of a window of steps during which one sample (3.1 GB) is snapshotted to
   pinned host memory on a side stream and written to disk (rtllm.store.writer.SampleWriter).
4. host syncs per step of the sampling loop (rtllm.run.sampling), counted on a tiny model with
   torch.cuda.set_sync_debug_mode (scripts/count_syncs.py).

CUDA-only calls (events, memory statistics, the memory limit, the sync counter) sit behind device
checks: on CPU those fields are null. Smoke figures mean nothing; they only prove the paths run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

GIB = 2**30
XL_NUMEL = 1.56e9  # GPT-2 XL's parameters (1,557,611,200)
TARGETS = dict(kernel_frac_of_copy=0.85, two_pass_over_floor=1.15, offload_over_step=0.02,
               peak_gib_8x1024=22.0)


class Marks:
    """Timestamps on the device stream: CUDA events (read after one sync at the end) or, on CPU,
    perf_counter. Marks on the stream include any time the GPU waits for the host."""

    def __init__(self, device: torch.device) -> None:
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def build(config, device: torch.device, checkpoint_every: int):
    """(model, sampler): the model built on the meta device, materialized by the sampler."""
    import rtllm
    from rtllm.lm.model_io import config_initializer, meta_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what sampling.py uses
    torch.manual_seed(0)
    model = meta_model(config, dtype=dtype)
    sampler = rtllm.RayTracer(model.parameters(), dt=1e-6, loss_tolerance=0.05, ray="model",
                              device=device, init_weights=config_initializer(model))
    set_checkpointing(model, checkpoint_every)
    return model, sampler


def set_checkpointing(model, every: int) -> None:
    from rtllm.lm.model_io import prepare_for_sampling

    prepare_for_sampling(model, checkpointing=every > 0, checkpoint_every=max(every, 1))


def run_steps(model, sampler, ids, steps: int, marks: Marks, writer=None, index: int = 0) -> None:
    """`steps` whole steps as the sampling loop takes them, 2 marks per step and one at the end.
    With a writer, sample `index` is submitted after the first step (the loop's order: submit,
    then wait for the snapshot before the next update)."""
    from rtllm.lm.loss import lm_loss

    for i in range(steps):
        marks.mark()
        sampler.zero_grad()
        lm_loss(model, ids[:, :-1], ids[:, 1:]).backward()
        marks.mark()
        if writer is not None:
            writer.wait_snapshot()
        sampler.step()
        if writer is not None and i == 0:
            writer.submit(index=index, chain=0, step=i, loss=None, heldout_loss=None)
    marks.mark()


def free_cache(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def planned(config, batch: int, seq: int, device: torch.device, checkpoint_every: int) -> dict:
    """rtllm.plan.memory's prediction for this very set-up: `peak_allocated` is what
    max_memory_allocated should read, `total` adds fragmentation and the CUDA context."""
    from rtllm.plan.memory import plan_memory

    plan = plan_memory(config, batch=batch, seq=seq, layout="fp32", device=device.type, from_meta=True,
                       checkpointing=checkpoint_every > 0, checkpoint_every=max(checkpoint_every, 1))
    return dict(planned_peak_allocated=plan.peak_allocated, planned_total=plan.total)


def measure_batch(model, sampler, config, batch: int, seq: int, steps: int, device: torch.device,
                  checkpoint_every: int, limit: int | None) -> dict:
    """One row: warm-up step, then `steps` timed steps; peak memory of the timed steps."""
    row = dict(batch=batch, seq=seq, checkpoint_every=checkpoint_every, limit_bytes=limit,
               **planned(config, batch, seq, device, checkpoint_every))
    ids = torch.randint(config.vocab_size, (batch, seq + 1), device=device)
    free_cache(device)
    times, skipped = None, sampler.skipped_steps
    try:
        run_steps(model, sampler, ids, 1, Marks(device))
        marks = Marks(device)
        run_steps(model, sampler, ids, steps, marks)
        times = marks.intervals()
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError is newer than the torch>=2.4 floor
        row["error"] = "out of memory"
    if times is None:  # outside the except block: its traceback no longer pins the activations
        sampler.zero_grad()
        free_cache(device)
        return row
    fwd_bwd = statistics.median(times[0::2])
    samp = statistics.median(times[1::2])
    row.update(fwd_bwd_s=fwd_bwd, sampler_s=samp, step_s=fwd_bwd + samp,
               fwd_bwd_tokens_per_s=batch * seq / fwd_bwd, tokens_per_s=batch * seq / (fwd_bwd + samp),
               sampler_share=samp / (fwd_bwd + samp), peak_allocated=None, peak_reserved=None,
               skipped_steps=sampler.skipped_steps - skipped)  # non-finite sums skip the update
    if device.type == "cuda":
        row["peak_allocated"] = torch.cuda.max_memory_allocated()
        row["peak_reserved"] = torch.cuda.max_memory_reserved()
        row["allocated_over_planned"] = row["peak_allocated"] / row["planned_peak_allocated"]
    return row


def model_section(config, batches, seq, steps, device, checkpoint_variants, limit_gib) -> dict:
    model, sampler = build(config, device, checkpoint_variants[0])
    out = dict(params=sampler.num_params, attn_implementation=model.config._attn_implementation,
               rows=[], limited_rows=[], limit_note=None,
               resident_after_build=torch.cuda.memory_allocated() if device.type == "cuda" else None)
    for every in checkpoint_variants:
        set_checkpointing(model, every)
        for b in batches:
            out["rows"].append(measure_batch(model, sampler, config, b, seq, steps, device, every, None))
    set_checkpointing(model, 1)
    if device.type != "cuda":
        out["limit_note"] = "the memory limit needs CUDA (set_per_process_memory_fraction)"
    else:
        total = torch.cuda.get_device_properties(device).total_memory
        limit = int(limit_gib * GIB)
        if limit >= total:
            out["limit_note"] = f"the GPU has only {total / GIB:.1f} GiB: no limit to emulate"
        else:
            free_cache(device)
            torch.cuda.set_per_process_memory_fraction(limit / total)
            try:
                for b in batches:
                    out["limited_rows"].append(measure_batch(model, sampler, config, b, seq, steps,
                                                             device, 1, limit))
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0)
    out["model"], out["sampler"] = model, sampler
    return out


def offload_section(model, sampler, config, batch, seq, steps, device, tmp: Path) -> dict:
    """Window of `steps` steps without, with, and again without one sample offload."""
    from rtllm.store.writer import SampleWriter

    ids = torch.randint(config.vocab_size, (batch, seq + 1), device=device)
    with tempfile.TemporaryDirectory(dir=tmp) as out_dir:
        writer = SampleWriter.from_model(Path(out_dir), model, sample_dtype=None,
                                         run_config={"benchmark": "bench_gpu offload"}, max_pending=1)
        with writer:
            # Warm-up: the pinned host buffer is allocated once per run, not per sample.
            run_steps(model, sampler, ids, 1, Marks(device), writer, index=0)
            writer.flush()
            windows = {}
            for name, w in (("base1", None), ("offload", writer), ("base2", None)):
                marks = Marks(device)
                run_steps(model, sampler, ids, steps, marks, w, index=1)
                windows[name] = sum(marks.intervals())
                t0 = time.perf_counter()
                writer.flush()
                if name == "offload":
                    windows["write_tail_s"] = time.perf_counter() - t0
            sample_bytes = writer.bytes_per_sample
    base = (windows["base1"] + windows["base2"]) / 2
    step = base / steps
    cost = windows["offload"] - base
    return dict(batch=batch, seq=seq, steps=steps, sample_bytes=sample_bytes, window_base_s=base,
                window_offload_s=windows["offload"], base_noise_s=abs(windows["base1"] - windows["base2"]),
                cost_s=cost, cost_over_step=cost / step, cost_over_window=cost / base,
                write_tail_s=windows["write_tail_s"])


def machine(device: torch.device) -> dict:
    info = dict(torch=torch.__version__, date=time.strftime("%Y-%m-%d"), device=str(device),
                alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        info["commit"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, total_memory=props.total_memory, cuda=torch.version.cuda)
    else:
        info["name"] = f"CPU, {torch.get_num_threads()} threads"
    return info


def targets(result: dict) -> dict:
    k, off = result["kernels"], result["offload"]
    at8 = [r for r in result["model"]["limited_rows"] or result["model"]["rows"]
           if r["batch"] == 8 and r["checkpoint_every"] == 1 and "error" not in r]
    peak = at8[0]["peak_allocated"] / GIB if at8 and at8[0]["peak_allocated"] is not None else None

    def check(value, limit, at_least=False):
        met = None if value is None else (value >= limit if at_least else value <= limit)
        return dict(value=value, target=limit, met=met)

    return dict(
        kernel_frac_of_copy=check(min(k["reduce_frac_of_copy"], k["update_frac_of_copy"]),
                                  TARGETS["kernel_frac_of_copy"], at_least=True),
        two_pass_over_floor=check(k["two_pass_over_floor"], TARGETS["two_pass_over_floor"]),
        offload_over_step=check(off.get("cost_over_step"), TARGETS["offload_over_step"]),
        peak_gib_8x1024=check(peak, TARGETS["peak_gib_8x1024"]))


def gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def print_tables(r: dict) -> None:
    m, k, o = r["machine"], r["kernels"], r["offload"]
    print(f"# bench_gpu: {m['name']}, torch {m['torch']}, commit {m['commit']}, {m['date']}"
          f"{'  (SMOKE: sizes are tiny, figures mean nothing)' if r['smoke'] else ''}\n")
    print("| elements | copy GB/s | reduce GB/s (of copy) | update GB/s (of copy) | two passes ms | "
          "26 B/param floor ms | ratio |\n|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {k['numel']:.3g} | {k['copy_GBps']:.0f} | {k['reduce_GBps']:.0f} ({k['reduce_frac_of_copy']:.0%}) | "
          f"{k['update_GBps']:.0f} ({k['update_frac_of_copy']:.0%}) | {k['two_pass_ms']:.2f} | "
          f"{k['floor_ms']:.2f} | {k['two_pass_over_floor']:.2f} |\n")
    print(f"{r['model']['params'] / 1e9:.3f}e9 parameters, attention {r['model']['attn_implementation']}; "
          f"sampler step vs its floor at the largest batch: "
          f"{r['model'].get('sampler_over_floor') or float('nan'):.2f}x\n")
    print("| limit | ckpt every | batch x seq | fwd+bwd tok/s | step tok/s | sampler share | peak alloc GiB "
          "(planned) | peak reserved GiB | planned total GiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in r["model"]["rows"] + r["model"]["limited_rows"]:
        head = f"| {gib(row['limit_bytes']) if row['limit_bytes'] else 'none'} | {row['checkpoint_every'] or 'off'} " \
               f"| {row['batch']} x {row['seq']} "
        if "error" in row:
            print(head + f"| {row['error']} | | | - ({gib(row['planned_peak_allocated'])}) | - | "
                         f"{gib(row['planned_total'])} |")
            continue
        print(head + f"| {row['fwd_bwd_tokens_per_s']:.0f} | {row['tokens_per_s']:.0f} | "
              f"{row['sampler_share']:.1%} | {gib(row['peak_allocated'])} ({gib(row['planned_peak_allocated'])}) | "
              f"{gib(row['peak_reserved'])} | {gib(row['planned_total'])} |")
    if r["model"]["limit_note"]:
        print(f"\n(24 GiB limit: {r['model']['limit_note']})")
    if "error" in o:
        print(f"\nOffload: failed ({o['error']})")
    else:
        print(f"\nOffload of one {o['sample_bytes'] / 1e9:.2f} GB sample over {o['steps']} steps of "
              f"{o['batch']} x {o['seq']}: +{o['cost_s'] * 1e3:.1f} ms = {o['cost_over_step']:.1%} of one "
              f"step ({o['cost_over_window']:.2%} of the window; baseline noise "
              f"{o['base_noise_s'] * 1e3:.1f} ms; write finished {o['write_tail_s']:.1f} s after the window)")
    print(f"Host syncs per loop step: {json.dumps(r['syncs'])}\n")
    print("| target | value | limit | met |\n|---|---:|---:|---|")
    for name, t in r["targets"].items():
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        print(f"| {name} | {value} | {t['target']} | {t['met']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU test of every code path)")
    ap.add_argument("--device", default=None, help="default: cuda when visible, else cpu")
    ap.add_argument("--kernel-numel", type=float, default=XL_NUMEL)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per batch size (after one warm-up)")
    ap.add_argument("--checkpoint-every", type=int, nargs="+", default=[1, 0],
                    help="checkpointing variants of the unlimited run (1: every block, 0: off)")
    ap.add_argument("--limit-gib", type=float, default=24.0)
    ap.add_argument("--offload-steps", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=5, help="kernel timings: median of this many")
    ap.add_argument("--tmp", type=Path, default=None, help="where the offloaded sample is written")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA GPU is visible; use --smoke on CPU")
    if device.type != "cuda" and not args.smoke:
        ap.error("without a CUDA GPU only --smoke runs (tiny sizes on CPU)")
    if args.steps < 1 or args.offload_steps < 1 or any(k < 0 for k in args.checkpoint_every):
        ap.error("--steps and --offload-steps need values >= 1, --checkpoint-every values >= 0")
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import triton
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_update import bench_kernels
    from count_syncs import count_loop_syncs

    from rtllm.lm.presets import preset_config

    if args.smoke:
        from transformers import GPT2Config

        config = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=512, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        args.kernel_numel, args.batches, args.seq, args.steps = 4096, [1, 2], 32, 1
        args.offload_steps, args.repeat = 1, 1
    else:
        config = preset_config("gpt2-xl")
    result = dict(smoke=args.smoke, machine=machine(device), targets_spec=TARGETS, section_s={})
    clock = time.perf_counter()

    def lap(name: str) -> None:
        """Wall seconds per section (the budget of a GPU session); the JSON so far is saved, so a
        failure later does not lose what was measured."""
        nonlocal clock
        result["section_s"][name], clock = time.perf_counter() - clock, time.perf_counter()
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=2))
            os.replace(tmp, args.json)

    def guarded(fn, *fn_args) -> dict:
        """The last two sections have never run on a GPU: an error there is recorded, not fatal."""
        try:
            return fn(*fn_args)
        except Exception as err:  # noqa: BLE001 - reported in the JSON and on stderr
            traceback.print_exc()
            return dict(error=f"{type(err).__name__}: {err}")

    result["kernels"] = bench_kernels(int(args.kernel_numel), args.repeat, device)
    lap("kernels")
    free_cache(device)
    sec = model_section(config, args.batches, args.seq, args.steps, device, args.checkpoint_every,
                        args.limit_gib)
    model, sampler = sec.pop("model"), sec.pop("sampler")
    ok = [r for r in sec["rows"] if "error" not in r and r["checkpoint_every"] == 1]
    largest = max(ok, key=lambda r: r["batch"]) if ok else None
    # The whole sampler step (two passes, the scalar rule, its host sync) against the 26 B floor.
    floor_s = sec["params"] * 26 / (result["kernels"]["copy_GBps"] * 1e9)
    sec["sampler_over_floor"] = largest["sampler_s"] / floor_s if largest else None
    result["model"] = sec
    lap("model")
    if largest is None:
        raise SystemExit("every checkpointed batch size ran out of memory: nothing to offload over")
    result["offload"] = guarded(offload_section, model, sampler, config, largest["batch"], args.seq,
                                args.offload_steps, device, args.tmp)
    lap("offload")
    del model, sampler
    free_cache(device)
    result["syncs"] = guarded(count_loop_syncs, device, args.tmp)
    result["targets"] = targets(result)
    lap("syncs")
    print_tables(result)


if __name__ == "__main__":
    main()
