"""The settings of `rtllm fiber` (rtllm.run.fiber): a frozen dataclass, importable without torch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

MAPS = ("pca", "mlp", "none")


@dataclass(frozen=True)
class FiberConfig:
    """Defaults for lr, drift and tolerance: the sweep on the tiny GPT-2 in docs/fiber.md."""

    model: str
    train: tuple[str, ...]
    out: str
    heldout: tuple[str, ...] | None = None
    particles: int = 4
    steps: int = 100  # walk steps (gradients) per particle
    lr: float = 0.03  # eta
    drift: float = 8.0  # beta: the drift moves x by lr * drift per step
    tangent: bool = False
    tolerance: float = 0.05  # nats per token above the start, on the evaluation batch
    thin: int = 5
    max_pullback: int = 20
    map: str = "pca"
    rank: int = 4
    generated: int = 8
    batch_size: int = 8
    seq_len: int = 64
    eval_sequences: int = 8
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("particles", "steps", "thin", "rank", "batch_size", "seq_len", "eval_sequences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        for name in ("generated", "max_pullback"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value!r}")
        for name, allow_zero in (("lr", False), ("drift", True), ("tolerance", False)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
                raise ValueError(f"--{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
        if self.map not in MAPS:
            raise ValueError(f"--map must be one of {', '.join(MAPS)}, got {self.map!r}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out)
