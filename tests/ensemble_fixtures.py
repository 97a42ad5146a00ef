"""Small ensembles of the tiny GPT-2 in any sample format, for tests of readers and users."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from rtllm.store.writer import SampleWriter, copy_tokenizer


def write_ensemble(model_dir: Path, out: Path, *, n: int = 3, scale: float = 0.05,
                   sample_format: str = "safetensors", seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Samples x_i = x_start + scale * std(param) * N(0, 1), written by SampleWriter in
    `sample_format`; the true (unquantized) state dicts are returned. Same seed, same samples
    in every format."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    truth = []
    with SampleWriter(out, model_config=model.config, named_tensors=model.state_dict(),
                      sample_dtype=None, run_config={"seed": seed}, sample_format=sample_format) as w:
        for i in range(n):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    noise = torch.randn(p.shape, generator=gen)
                    p.copy_(start[name] + scale * p.std().nan_to_num(0.02).clamp_min(0.02) * noise)
            truth.append({k: v.clone() for k, v in model.state_dict().items()})
            w.submit(index=i, chain=0, step=10 * i, loss=3.0, heldout_loss=3.0 + i / 10)
    copy_tokenizer(model_dir, out)
    return truth
