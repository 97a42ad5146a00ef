"""Host syncs per step of the sampling loop (rtllm.run.sampling.SamplingRun), counted on CUDA.

    python scripts/count_syncs.py          # a CUDA machine; also part of scripts/bench_gpu.py

torch.cuda.set_sync_debug_mode("warn") warns at every synchronizing call (a blocking copy to or
from the host, .item(), a stream sync); the warnings of a short and a long run of a tiny random
GPT-2 are counted and differenced, so set-up, the final sample and the final checkpoint cancel.
Two cases: with an undo copy of x and v (a loss jump is undone, so the loss must be read before
the step) and without one (the step is taken whatever the loss).
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch


def tiny_model_dir(root: Path) -> Path:
    """A random 2-block GPT-2 and a byte-level BPE tokenizer trained on the bundled plays."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rtllm.lm.corpus import train_files
    from rtllm.lm.pretrain import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([train_files()[0].read_text(encoding="utf-8")[:8000]], 384, max_length=64)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def count_loop_syncs(device: torch.device, tmp: Path, short: int = 3, long: int = 7) -> dict:
    """Host syncs per step of SamplingRun's loop: (syncs of a long run - a short run) / extra steps,
    so set-up, the final sample and the checkpoint cancel out. On CPU there is no sync counter:
    one short run only checks that the path runs, and the counts are null."""
    from rtllm.run.config import SampleConfig
    from rtllm.lm.corpus import train_files
    from rtllm.run.sampling import SamplingRun

    out = {}
    with tempfile.TemporaryDirectory(dir=tmp) as root:
        model_dir = tiny_model_dir(Path(root) / "model")
        cuda = device.type == "cuda"
        # Without room for an undo copy the loop takes the no_undo_copy path whatever the threshold.
        for label, reject in (("undo_copy", 1.0), ("no_undo_copy", None))[:2 if cuda else 1]:
            counts = []
            for steps in (short, long)[:2 if cuda else 1]:
                cfg = SampleConfig(model=str(model_dir), train=(str(train_files()[1]),), device=str(device),
                                   out=str(Path(root) / f"{label}-{steps}"), steps=steps, burn_in=steps - 1,
                                   thin=1, dt=1e-4, batch_size=4, seq_len=32, log_every=10**6,
                                   reject_threshold=reject)
                run = SamplingRun(cfg, log=lambda _: None)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if cuda:
                        torch.cuda.set_sync_debug_mode("warn")
                    try:
                        run.run()
                    finally:
                        if cuda:
                            torch.cuda.set_sync_debug_mode(0)
                counts.append(sum("synchroniz" in str(w.message).lower() for w in caught))
            out[label] = dict(undo_copy=run.state["undo"],
                              syncs_per_step=(counts[1] - counts[0]) / (long - short) if cuda else None)
    return out


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("count_syncs.py needs a CUDA GPU (the sync counter is CUDA's)")
    print(json.dumps(count_loop_syncs(torch.device("cuda"), None), indent=2))
