"""GPT-2 model presets built from their published configs: no download, no weights.

Used wherever the size of a model matters before (or instead of) loading one: the memory
planner, the scale benchmarks, meta-device construction.
"""
from __future__ import annotations

# n_embd, n_layer, n_head of the four released GPT-2 sizes (vocab 50257, context 1024).
_GPT2_SIZES = {
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}
PRESETS = tuple(_GPT2_SIZES)


def preset_config(name: str):
    """The transformers `GPT2Config` of a preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl)."""
    if name not in _GPT2_SIZES:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)} or pass "
                         f"a local model directory")
    from transformers import GPT2Config

    n_embd, n_layer, n_head = _GPT2_SIZES[name]
    return GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=50257,
                      n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def config_for(model: str):
    """A preset's config, or the config.json of a local model directory (read, never downloaded)."""
    if model in _GPT2_SIZES:
        return preset_config(model)
    from pathlib import Path

    from transformers import AutoConfig

    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a local model "
                         f"directory with a config.json")
    return AutoConfig.from_pretrained(path, local_files_only=True)
