"""Benchmark: ensemble evaluation against plain forward passes, and memory vs samples.

    python scripts/bench_evaluate.py                          # a synthetic 8-sample tiny ensemble
    python scripts/bench_evaluate.py --ensemble rtllm-demo/ensemble --text rtllm/lm/corpus/tempest.txt

1. Throughput: `rtllm.evaluate` on all samples vs plain `model(ids).logits` passes of
   the same samples over the same windows. Sample loading (safetensors read + load_state_dict)
   is timed on its own and taken out of both, so the ratio compares compute. Target >= 0.9x.
2. Peak memory (process peak RSS, each in its own subprocess) for 2, 4, 8 samples. Target: flat.
Prints markdown.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def synthetic_ensemble(out: Path, n_samples: int) -> Path:
    """A random demo-size GPT-2 and n perturbed copies written as an ensemble."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rtllm.lm.pretrain import train_bpe_tokenizer
    from rtllm.lm.corpus import train_files
    from rtllm.store.writer import SampleWriter

    tok = train_bpe_tokenizer([train_files()[0].read_text()[:50_000]], 2048, max_length=128)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=128, n_layer=4,
                                       n_head=4, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    tok.save_pretrained(out)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with SampleWriter(out, model_config=model.config, named_tensors=model.state_dict(), sample_dtype=None,
                      run_config={"synthetic": True}) as writer:
        for i in range(n_samples):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(start[name] + 0.01 * torch.randn_like(p))
            writer.submit(index=i, chain=0, step=i, loss=None, heldout_loss=None)
    return out


def throughput(ensemble: Path, text: Path, seq_len: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from rtllm.store.ensemble import Ensemble
    from rtllm.evaluation.streaming import evaluate, load_ensemble_tokenizer, make_windows

    ens = Ensemble(ensemble)
    t0 = time.perf_counter()
    result = evaluate(ensemble, [text], seq_len=seq_len)
    t_eval = time.perf_counter() - t0
    tokenizer = load_ensemble_tokenizer(ens.out_dir)
    model = ens.load_model(ens.entries[0]["index"], local_files_only=True).eval()
    windows, _, seq = make_windows(tokenizer, [text], None, seq_len, 10**9)
    t_load = t_fwd = 0.0
    with torch.inference_mode():
        for e in ens.entries:
            t0 = time.perf_counter()
            model.load_state_dict(load_file(ens.path(e["index"]) / "model.safetensors"), strict=False)
            t1 = time.perf_counter()
            for rows in windows.split(64):
                model(rows[:, :-1]).logits
            t_load, t_fwd = t_load + t1 - t0, t_fwd + time.perf_counter() - t1
    tokens = result.summary["n_tokens"] * len(ens.entries)
    return dict(samples=len(ens.entries), tokens_x_samples=tokens, eval_s=t_eval, load_s=t_load,
                plain_forward_s=t_fwd, eval_compute_s=t_eval - t_load,
                ratio=t_fwd / max(t_eval - t_load, 1e-9))


def peak_rss(ensemble: Path, text: Path, seq_len: int, n: int) -> int:
    code = ("import resource, sys; from rtllm.evaluation.streaming import evaluate; "
            f"evaluate({str(ensemble)!r}, [{str(text)!r}], seq_len={seq_len}, max_samples={n}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ensemble", type=Path, help="an ensemble directory (default: a synthetic one)")
    ap.add_argument("--text", type=Path, help="text to evaluate (default: the bundled held-out play)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from rtllm.lm.corpus import heldout_files

    text = args.text or heldout_files()[0]
    with tempfile.TemporaryDirectory() as tmp:
        ensemble = args.ensemble or synthetic_ensemble(Path(tmp) / "ens", 8)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        print(f"# bench_evaluate: CPU, commit {commit}, {time.strftime('%Y-%m-%d')}, text {text.name}, "
              f"seq_len {args.seq_len}\n")
        t = throughput(ensemble, text, args.seq_len)
        print("| samples | tokens x samples | evaluate s | of which loading s | plain forward s | "
              "compute ratio (plain / ours) |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(f"| {t['samples']} | {t['tokens_x_samples']} | {t['eval_s']:.2f} | {t['load_s']:.2f} | "
              f"{t['plain_forward_s']:.2f} | {t['ratio']:.2f} |")
        mem = {n: peak_rss(ensemble, text, args.seq_len, n) for n in (2, 4, 8) if n <= t["samples"]}
        print("\n| samples | peak RSS GiB |\n|---:|---:|")
        for n, b in mem.items():
            print(f"| {n} | {b / 2**30:.2f} |")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(dict(commit=commit, throughput=t, peak_rss=mem), indent=2))


if __name__ == "__main__":
    main()
