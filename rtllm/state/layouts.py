"""State layouts: how many bytes per sampled parameter each of the sampler's buffers takes.

The memory planner (rtllm.plan.memory) reads this registry and plans every layout in it, so a new
layout (say, a compensated bf16 position pair that passes the precision study) is planned by
adding one entry here. A layout describes bytes, not code: the sampler implements the layout.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Bytes per sampled parameter of the sampler's buffers (rtllm.state.flat.Shard).

    position, velocity: the chain's state. gradient: None means the compute dtype's size (the
    gradient buffer has the parameters' dtype). The compute copy is the model's weights in the
    compute dtype; it costs nothing when the position buffer already is that copy, i.e. when the
    compute dtype's size equals `position_serves_compute` (fp32 position on an fp32 model).
    """

    name: str
    position: int
    velocity: int
    gradient: int | None
    position_serves_compute: int | None
    description: str
    # The one compute dtype (torch dtype name) the layout works with; None: any. The sampler
    # refuses other parameter dtypes, so a planner should skip the layout for them.
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        for field in ("position", "velocity"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ValueError(f"layout {self.name!r}: {field} must be an int >= 1 bytes/param")
        if self.gradient is not None and (not isinstance(self.gradient, int) or self.gradient < 1):
            raise ValueError(f"layout {self.name!r}: gradient must be None (compute dtype) or an "
                             f"int >= 1 bytes/param")

    def bytes_per_param(self, compute_itemsize: int) -> dict[str, int]:
        """{'position', 'velocity', 'gradient', 'compute copy'} in bytes/param for a compute dtype."""
        copy = 0 if compute_itemsize == self.position_serves_compute else compute_itemsize
        return {"position": self.position, "velocity": self.velocity,
                "gradient": compute_itemsize if self.gradient is None else self.gradient,
                "compute copy": copy}


LAYOUTS: dict[str, Layout] = {
    "fp32": Layout(
        name="fp32", position=4, velocity=4, gradient=None, position_serves_compute=4,
        description="fp32 position and velocity, gradient and compute copy in the compute dtype "
                    "(12 B/param with bf16 compute; on an fp32 model the position is the compute "
                    "copy: 12 B/param with an fp32 gradient)"),
    # docs/precision.md: the bit pattern of the fp32 position cut into two 16-bit planes; the
    # high one, rounded to nearest, is the bf16 model's weights. Bit-exact fp32, so the same
    # chain as "fp32", without the separate compute copy.
    "fp32-split": Layout(
        name="fp32-split", position=4, velocity=4, gradient=None, position_serves_compute=2,
        compute_dtype="bfloat16",
        description="fp32 position stored as a bf16 high plane (the model's weights) and an int16 "
                    "low plane, fp32 velocity, bf16 gradient: 10 B/param, the fp32 position "
                    "update bit for bit (its bf16 weights round ties away from zero, the fp32 layout's "
                    "to even: 1 element in 65536 differs by one bf16 ulp); bf16 models only"),
}
DEFAULT_LAYOUT = "fp32"


def get_layout(name: str) -> Layout:
    """The registered layout `name`, or a one-line error listing the registered ones."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; registered layouts: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]
