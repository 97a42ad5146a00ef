"""The configuration of a sampling run: one frozen, validated dataclass.

It is written into ensemble.json and every checkpoint, so a run can be resumed and audited.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

# The defaults give a useful ensemble on the built-in demo without tuning (docs/sampling.md).
DEFAULT_LOSS_TOLERANCE = 0.05  # nats per token the posterior may sit above the optimum
MAX_COUNT = 2**63 - 1  # largest step count, seed or size accepted: counters are int64 downstream


@dataclass(frozen=True)
class SampleConfig:
    model: str
    train: tuple[str, ...]
    out: str
    heldout: tuple[str, ...] = ()
    steps: int = 1000
    # "auto": until the held-out loss has no significant trend, at most half the steps
    # (rtllm/run/burn_in.py); ray tracing only.
    burn_in: int | str = 200
    thin: int = 20
    dt: float | str = "auto"
    loss_tolerance: float | None = None
    scale_likelihood: float | None = None
    scale: str = "tolerance"  # how S is set when not given: rtllm/run/likelihood_scale.py
    prior_scale: float | None = None
    prior_center: str = "zero"
    batch_size: int = 8
    micro_batch: int | None = None
    seq_len: int | None = None
    refresh_rate: float = 1.0
    params: str | None = None
    ray_per: str = "model"
    # nats a step's loss may jump before the step is undone; "auto": in the posterior's units
    # (rtllm.samplers.movement.undo_threshold); None: no undo (only non-finite losses flag).
    reject_threshold: float | str | None = "auto"
    log_every: int = 10
    checkpoint_every: int | None = None  # steps; None: about every 10 minutes of run time
    # Activation checkpointing of blocks 0, k, 2k, ... only: faster (measured 0.88x fwd+bwd time at
    # k=2 on CPU), more activation memory (docs/benchmarks.md); 1 = every block.
    activation_checkpoint_every: int = 1
    sample_dtype: str = "compute"
    # "safetensors" (from_pretrained directories) or "delta8" / "nf4": offsets from the start
    # quantized blockwise with bitsandbytes (rtllm/store/delta.py), the start stored once.
    sample_format: str = "safetensors"
    # State layout (rtllm.state.layouts): "fp32", or "fp32-split" (the same chain in 10 instead of 12
    # bytes/parameter; the model then computes in bf16, also on CPU). docs/precision.md.
    layout: str = "fp32"
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    chain: int = 0
    dt_trial_steps: int = 10
    # "smile": MCLMC on minibatches (rtllm.samplers.smile), dt its initial step size ("auto": 0.03),
    # then adapted by its controller; burn-in and thin even, as for mclmc.
    # "ray" (the ray tracer) or "mclmc" (microcanonical Langevin, as inside MILE). For mclmc, dt
    # is the step size per full step (two gradients) and `steps`, `burn_in`, `thin` still count
    # gradients; `L` is the decoherence length ("auto": tuned during the burn-in, whose first
    # 2 * sum(tune_phases) gradients run MILE's phases I-III; default phases 80/10/10% of it).
    sampler: str = "ray"
    L: float | str = "auto"
    tune_phases: tuple[int, int, int] | None = None
    # MCLMC tuner's Var[dE]/D schedule (rtllm.samplers.mclmc_tune): "unbiased", or MILE's "mile"
    # (biased on the Gaussian/Rosenbrock battery; `rtllm mile` keeps it, as the paper does).
    mclmc_target: str = "unbiased"
    # pSMILE: SMILE with the authors' diagonal preconditioner (rtllm.samplers.smile_precond)
    precondition: bool = False
    # its clip of s: "relative" ([0.1, 100] x rms(s), scale-free) or the authors' "absolute" [1e-2, 1e4]
    precondition_clip: str = "relative"
    init: str | None = None  # weights to start from (same architecture as `model`), e.g. a MILE member
    encoding: str | None = None  # of the text files; None: UTF-8, strictly (rtllm.lm.data)
    # One chain over the ranks of a torchrun launch: FSDP2-sharded model and sampler state, exact
    # per-ray sums (rtllm.state.sharded, rtllm.run.sharded_run); on one process the same chain.
    shard_state: bool = False
    extra: dict = field(default_factory=dict)  # free-form notes carried into the manifest

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= "
                                 f"{0 if allow_zero else 1}, got {value!r}")
            if value > MAX_COUNT:
                raise ValueError(f"--{name.replace('_', '-')} must be at most 2**63 - 1, "
                                 f"got {value}")

        def positive_float(name: str, value) -> None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value!r}")

        if not self.train:
            raise ValueError("--train needs at least one text file or directory")
        for name in ("steps", "thin", "batch_size", "log_every", "dt_trial_steps", "activation_checkpoint_every"):
            positive_int(name)
        for name in ("chain", "seed") + (() if self.burn_in == "auto" else ("burn_in",)):
            positive_int(name, allow_zero=True)
        if self.burn_in == "auto":
            if self.sampler != "ray":
                raise ValueError("--burn-in auto works with --sampler ray; MCLMC tunes in a fixed "
                                 "burn-in: give it a number of steps")
        elif self.burn_in >= self.steps:
            raise ValueError(f"--burn-in ({self.burn_in}) must be smaller than --steps ({self.steps}), "
                             f"which counts the burn-in too")
        if self.dt != "auto":
            positive_float("dt", self.dt)
        if self.loss_tolerance is not None and self.scale_likelihood is not None:
            raise ValueError("give --loss-tolerance or --scale-likelihood, not both")
        if self.scale not in ("tolerance", "tokens", "tempered"):
            raise ValueError(f"--scale must be tolerance, tokens or tempered, got {self.scale!r}")
        if self.scale != "tolerance" and self.scale_likelihood is not None:
            raise ValueError("--scale-likelihood sets S itself: drop --scale")
        if self.scale == "tokens" and self.loss_tolerance is not None:
            raise ValueError("--scale tokens sets S = the number of training tokens: drop --loss-tolerance")
        for name in ("loss_tolerance", "scale_likelihood", "prior_scale", "reject_threshold"):
            value = getattr(self, name)
            if value is not None and not (name == "reject_threshold" and value == "auto"):
                positive_float(name, value)
        if self.refresh_rate < 0 or not math.isfinite(self.refresh_rate):
            raise ValueError(f"--refresh-rate must be >= 0, got {self.refresh_rate!r}")
        if self.micro_batch is not None:
            positive_int("micro_batch")
            if self.batch_size % self.micro_batch:
                raise ValueError(f"--micro-batch ({self.micro_batch}) must divide --batch-size "
                                 f"({self.batch_size})")
        if self.seq_len is not None:
            positive_int("seq_len")
        if self.checkpoint_every is not None:
            positive_int("checkpoint_every")
        for name, allowed in (("prior_center", ("zero", "start")), ("ray_per", ("model", "group", "tensor")),
                              ("sample_dtype", ("compute", "fp32")),
                              ("sample_format", ("safetensors", "delta8", "nf4"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")

        from rtllm.state.layouts import get_layout

        get_layout(self.layout)
        if self.layout == "fp32-split" and self.sample_dtype == "fp32":
            raise ValueError("--sample-dtype fp32 with --layout fp32-split is not supported (the "
                             "position's two planes are not one fp32 tensor to export): use "
                             "--sample-dtype compute, or --layout fp32")
        if self.shard_state:
            self._check_shard_state()
        if self.sampler not in ("ray", "mclmc", "smile"):
            raise ValueError(f"--sampler must be ray, mclmc or smile, got {self.sampler!r}")
        if self.precondition and (self.sampler != "smile" or self.shard_state):
            raise ValueError("--precondition is pSMILE's: it needs --sampler smile, without --shard-state")
        if self.precondition_clip not in ("relative", "absolute"):
            raise ValueError(f"--precondition-clip must be relative or absolute, got {self.precondition_clip!r}")
        if self.sampler in ("mclmc", "smile"):
            if self.layout != "fp32":
                raise ValueError(f"--layout {self.layout} works with --sampler ray; {self.sampler.upper()} "
                                 f"needs --layout fp32")
            if self.sampler == "smile" and (self.tune_phases is not None or self.L != "auto"):
                raise ValueError("--L and --tune-phases are MCLMC settings: SMILE never refreshes its "
                                 "velocity and its controller adapts the step size")
            self._check_mclmc(positive_float)
        elif self.tune_phases is not None or self.L != "auto" or self.mclmc_target != "unbiased":
            raise ValueError("--L, --tune-phases and --mclmc-target are MCLMC settings; pass --sampler mclmc")

    def _check_mclmc(self, positive_float) -> None:
        # A full MCLMC step spans two gradients: samples and the end of tuning must fall on the
        # boundary between full steps.
        for name in ("burn_in", "thin"):
            if getattr(self, name) % 2:
                raise ValueError(f"--{name.replace('_', '-')} must be even with --sampler mclmc (a full "
                                 f"step takes two gradients), got {getattr(self, name)}")
        if self.L != "auto":
            positive_float("L", self.L)
        if self.mclmc_target not in ("unbiased", "mile"):
            raise ValueError(f"--mclmc-target must be unbiased or mile, got {self.mclmc_target!r}")
        phases = self.mclmc_phases
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in phases) or phases[0] < 1:
            raise ValueError(f"--tune-phases must be three integers >= 0 (the first >= 1), got {phases!r}")
        if 2 * sum(phases) > self.burn_in:
            raise ValueError(f"--tune-phases {phases} take {2 * sum(phases)} gradients, more than "
                             f"--burn-in {self.burn_in}: raise --burn-in or shorten the phases")

    @property
    def mclmc_phases(self) -> tuple[int, int, int]:
        """MCLMC tuning phases I, II, III in full steps (MILE: 40k / 5k / 5k)."""
        if self.tune_phases is not None:
            return tuple(self.tune_phases)
        full = self.burn_in // 2
        two, three = full // 10, full // 10
        return (full - two - three, two, three)

    @property
    def tolerance(self) -> float:
        return self.loss_tolerance if self.loss_tolerance is not None else DEFAULT_LOSS_TOLERANCE

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def _check_shard_state(self) -> None:
        unsupported = [
            (self.layout != "fp32", f"--layout {self.layout}",
             "use --layout fp32 (12 bytes/parameter, divided over the ranks)"),
            (self.params is not None, "--params", "drop it: every parameter is sampled"),
            (self.sample_dtype != "compute", "--sample-dtype fp32",
             "drop it: samples are written in the compute dtype (fp32 on CPU, bf16 on GPU)"),
            (self.prior_center == "start", "--prior-center start",
             "drop it: the prior is centred at zero (--prior-scale sets its width)"),
            # MCLMC's and SMILE's energy holds the prior's |x|^2, a sum each rank would take over
            # its own shard only (the ray tracer's prior term is elementwise: fine)
            (self.prior_scale is not None and self.sampler in ("mclmc", "smile"),
             f"--prior-scale with --sampler {self.sampler}",
             "drop --prior-scale, or use --sampler ray")]
        named = [f"--shard-state does not support {name} yet: {remedy}"
                 for bad, name, remedy in unsupported if bad]
        if named:
            raise ValueError("; ".join(named))

    def chain_defining(self) -> dict:
        """The fields that define the chain: a resumed run must agree on all of them."""
        skip = {"out", "steps", "checkpoint_every", "log_every", "device", "extra"}
        return {k: v for k, v in self.to_json().items() if k not in skip}


@dataclass(frozen=True)
class MemberTraining:
    """How each member is trained. The paper trains small nets from scratch for ~1k epochs;
    for a pretrained LM a short fine-tune with a small learning rate is the analogue."""

    lr: float = 1e-4
    max_steps: int = 300
    eval_every: int = 20
    patience: int = 3  # evaluations without improvement before stopping
    batch_size: int = 8
    weight_decay: float = 0.01
    from_scratch: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "eval_every", "patience", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"member training {name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or \
                    (name == "lr" and value == 0):
                raise ValueError(f"member training {name} must be a finite number "
                                 f"{'> 0' if name == 'lr' else '>= 0'}, got {value!r}")


def chain_seed(seed: int, chain: int) -> int:
    """The seed chain `chain` runs with (sampler noise and minibatch order), from (seed, chain).

    Chain 0 uses `seed` itself, so a single-chain run is unchanged. Chain k > 0 uses the first
    8 bytes (little-endian) of sha256("rtllm-chain:{seed}:{chain}"), shifted right by one bit
    (a 63-bit seed is valid everywhere a seed goes). A pure function: chain k of a torchrun
    launch and `rtllm sample --chain k` alone are the same chain.
    """
    if chain == 0:
        return seed
    digest = hashlib.sha256(f"rtllm-chain:{seed}:{chain}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
