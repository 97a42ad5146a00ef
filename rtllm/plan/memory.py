"""Memory plan of a sampling run: bytes per component, the peak, and whether it fits.

`plan_memory(config, batch=, seq=)` reads the model's shape off the meta device (no weights,
no download), sizes the sampler's buffers from the state layout (rtllm.state.layouts) exactly as
rtllm.state.flat allocates them, and the activations from rtllm.plan.activations, then takes the peak over
the phases of a run: building the sampler, forward+backward, accumulating micro-batch
gradients, the sampler step, writing a checkpoint (on CPU; the dt-auto trials borrow disk, not
memory). `rtllm plan`
(rtllm.plan.format) prints it for every registered layout.

Assumptions (docs/sampling.md, "Memory plan"):
- CUDA: compute in bf16 (as `rtllm sample`), Triton kernels, cuBLAS/cuBLASLt workspaces of
  32 MiB each (Hopper's default), and two rows the allocator never reports: 5% of the peak for
  fragmentation (reserved minus allocated in the caching allocator) and 512 MiB for the CUDA
  context. `peak_allocated` is what `torch.cuda.max_memory_allocated` should read.
- CPU: fp32, the torch backend (its noise cache counts), 5% for allocator fragmentation.
- Host memory (pinned sample buffers, one slice of checkpoint staging) is listed apart; it is
  not GPU memory. The dt-auto trials park the state on disk (`disk`), not in host memory, and
  checkpoints are read as views of the mapped file: at GPT-2 XL the host needs under 16 GiB.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch

from rtllm.plan.activations import PARTS, UnknownArchitecture, activation_peak
from rtllm.state.layouts import DEFAULT_LAYOUT, LAYOUTS, get_layout
from rtllm.store.manifest import _CHUNK

GIB = 2**30
FRAGMENTATION = 0.05  # allocator margin: fraction of the peak lost to fragmentation
CUDA_CONTEXT_BYTES = 512 * 2**20  # driver context and kernel images, outside the allocator
CUDA_WORKSPACE_BYTES = 64 * 2**20  # cuBLAS + cuBLASLt workspaces (allocated through torch)
CUDA_BLOCK = 512  # the caching allocator rounds every allocation up to a multiple of this

# Row names, in display order.
WEIGHTS, POSITION, VELOCITY, GRADIENTS = "compute weights", "position", "velocity", "gradients"
PRIOR, UNDO, DT_SNAPSHOT = "prior center", "undo backup (x, v)", "dt-auto snapshot (x, v)"
LOADED, GRAD_ACC = "loaded weights (until copied)", "micro-batch grad accumulator"
PARTIALS, NOISE, PRIOR_TMP = "kernel partials", "noise cache (CPU backend)", "prior temporaries"
WORKSPACES, MARGIN, CONTEXT = "CUDA library workspaces", "allocator margin", "CUDA context"
SAMPLE_BUFFERS, CKPT_STAGING = "sample buffers", "checkpoint / dt-trial staging (one slice)"
SEGMENT_TABLES = "segment tables (Triton launches)"
# SMILE (rtllm.samplers.smile): x at the start of the full step in progress, for its rejections;
# pSMILE adds its preconditioner (rtllm.samplers.smile_precond): EMA mean, EMA variance and p.
SMILE_START, PRECOND = "SMILE step-start copy of x", "pSMILE preconditioner (mean, var, p)"
CHECKPOINT_SLICE_BYTES = _CHUNK  # the most of the state a checkpoint write holds on the host
HOST_BOUND = 16 * 2**30  # the host memory of a common PC: what a run should stay within
ROWS = (WEIGHTS, POSITION, VELOCITY, GRADIENTS, PRIOR, UNDO, SMILE_START, PRECOND, NOISE, SEGMENT_TABLES,
        WORKSPACES, SAMPLE_BUFFERS, LOADED, GRAD_ACC, *PARTS, PARTIALS, PRIOR_TMP, CKPT_STAGING)
# Phases of a run.
BUILD, FWD_BWD, ACCUMULATE, STEP, CHECKPOINT = (
    "sampler build", "forward/backward", "micro-batch gradient accumulation", "sampler step",
    "checkpoint write / dt-trial snapshot")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32,
           "fp64": torch.float64, "float64": torch.float64}


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model, read off the meta device."""

    name: str
    config: object
    num_params: int  # unique parameters (tied ones once)
    sampled: int
    frozen: int
    buffers: int  # elements of buffers (kept in the compute dtype when floating)
    shards: tuple[tuple[int, int], ...]  # (elements, global offset) of each sampler shard
    sample_numel: int  # elements written per sample (unique state-dict tensors)


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    layout: str
    device: str
    compute_dtype: str
    batch: int
    seq: int
    micro_batch: int
    num_params: int
    sampled_params: int
    components: dict[str, int]  # device memory at the peak phase, margin rows included
    persistent: dict[str, int]  # device memory held from the sampler's construction on
    transients: dict[str, dict[str, int]]  # phase -> what it adds to the persistent part
    phase_totals: dict[str, int]  # phase -> allocated device bytes at its peak
    peak_phase: str  # the phase with the largest transient part
    activation_phase: str  # where in forward+backward the activations peak ("" if unknown)
    host: dict[str, int]  # host memory (not on the GPU)
    gpu_mem: int | None
    activations_known: bool
    notes: tuple[str, ...] = field(default=())
    disk: dict[str, int] = field(default_factory=dict)  # scratch files in OUT while the run goes

    @property
    def host_total(self) -> int:
        """Host memory the plan counts (on CPU the device memory is host memory: `total`)."""
        return self.total if self.device == "cpu" else sum(self.host.values())

    @property
    def peak_allocated(self) -> int:
        """Predicted peak of allocated device memory (torch.cuda.max_memory_allocated)."""
        return sum(v for k, v in self.components.items() if k not in (MARGIN, CONTEXT))

    @property
    def total(self) -> int:
        """Device memory the run needs: the peak plus fragmentation and the CUDA context."""
        return sum(self.components.values())

    @property
    def fits(self) -> bool | None:
        """None when no memory size was given or the activations are unknown."""
        if self.gpu_mem is None or not self.activations_known:
            return None
        return self.total <= self.gpu_mem


# -- the model's shape ------------------------------------------------------------------------------
def model_shape(config, *, params: str | None = None, ray_per: str = "model",
                name: str | None = None) -> ModelShape:
    """Parameter counts and the sampler's shard layout, from the model built on the meta device.

    params: the `--params` regex of the sampled parameters (None: all); ray_per: as
    `rtllm sample --ray-per` (one parameter group per ray, each packed into its own shards).
    """
    from rtllm.state.flat import MAX_SHARD_ELEMENTS, _pack
    from rtllm.lm.model_io import param_groups_for, select_parameters

    model = _meta_model(config)
    sampled, frozen = select_parameters(model, params)
    groups = param_groups_for(sampled, ray_per)
    shards, offset = [], 0
    for group in groups:  # as FlatSampler: groups in order, each packed greedily into shards
        _, sizes = _pack(group["params"], MAX_SHARD_ELEMENTS)
        for n in sizes:
            shards.append((n, offset))
            offset += n
    unique = dict(model.named_parameters())  # tied parameters appear once
    persistent = [b for n, b in model.named_buffers() if n in model.state_dict()]
    return ModelShape(
        name=name or getattr(config, "name_or_path", "") or config.model_type, config=config,
        num_params=sum(p.numel() for p in unique.values()),
        sampled=sum(p.numel() for _, p in sampled), frozen=sum(unique[n].numel() for n in frozen),
        buffers=sum(b.numel() for b in model.buffers()), shards=tuple(shards),
        sample_numel=sum(p.numel() for p in unique.values()) + sum(b.numel() for b in persistent))


def _meta_model(config):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # config sanity warnings are not the plan's business
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise ValueError(f"cannot build a causal LM from a {type(config).__name__} ({err}); "
                         f"pass the config of a causal LM (e.g. GPT-2)") from err
    finally:
        hf_logging.set_verbosity(verbosity)


# -- the plan ---------------------------------------------------------------------------------------
def plan_memory(config, *, batch: int, seq: int, layout: str = DEFAULT_LAYOUT, device: str = "cuda",
                compute_dtype=None, micro_batch: int | None = None, prior_center: str | None = None,
                sampled_params: str | None = None, checkpointing: bool = True,
                gpu_mem_bytes: int | None = None, ray_per: str = "model", checkpoint_every: int = 1,
                dt_auto: bool = False, undo_backup: bool | str = False, from_meta: bool = False,
                sample_dtype: str = "compute", chunk_tokens: int | None = None, sampler: str = "ray",
                precondition: bool = False) -> MemoryPlan:
    """Plan the device memory of a sampling run of `config` (a transformers config or a
    ModelShape) at `batch` sequences of `seq` tokens per step.

    compute_dtype: None = bf16 on CUDA, fp32 on CPU (as `rtllm sample`); micro_batch: sequences
    per forward/backward (None: the whole batch); prior_center: None (no prior), 'zero' or
    'start'; sampled_params: the --params regex; gpu_mem_bytes: the memory to fit in (None:
    `fits` is None). The defaults plan the sampler's steady state; `rtllm sample`'s own
    defaults add dt_auto=True (a host copy of x and v during the dt trials) and
    undo_backup='auto' (a copy of x and v when free memory exceeds twice its size).
    from_meta: the model was built on the meta device and materialized into the buffers (no
    loaded copy at build time). sampler: 'ray', 'mclmc' or 'smile' (SMILE keeps a fp32 copy of
    x, 4 bytes/parameter); precondition: pSMILE's preconditioner (12 bytes/parameter).
    """
    if sampler not in ("ray", "mclmc", "smile"):
        raise ValueError(f"sampler must be 'ray', 'mclmc' or 'smile', got {sampler!r}")
    if precondition and sampler != "smile":
        raise ValueError("precondition is pSMILE's: it needs sampler='smile'")
    if sampler != "ray" and layout != "fp32":
        raise ValueError(f"sampler {sampler!r} runs layout 'fp32' only, got {layout!r}")
    _check_int("batch", batch)
    _check_int("seq", seq)
    micro = batch if micro_batch is None else _check_int("micro_batch", micro_batch)
    if batch % micro:
        raise ValueError(f"--micro-batch ({micro}) must divide --batch ({batch})")
    if gpu_mem_bytes is not None:
        _check_int("gpu_mem_bytes", gpu_mem_bytes)
    if prior_center not in (None, "zero", "start"):
        raise ValueError(f"prior_center must be None, 'zero' or 'start', got {prior_center!r}")
    if sample_dtype not in ("compute", "fp32"):
        raise ValueError(f"sample_dtype must be 'compute' or 'fp32', got {sample_dtype!r}")
    cuda = _device_kind(device) == "cuda"
    lay = get_layout(layout)
    # A layout tied to one compute dtype (fp32-split: bf16) makes the run compute in it, on
    # CPU too (rtllm sample loads the model so); another dtype asked for explicitly is an error.
    dtype = _compute_dtype(compute_dtype if compute_dtype is not None else lay.compute_dtype, cuda)
    if lay.compute_dtype is not None and dtype != _compute_dtype(lay.compute_dtype, cuda):
        raise ValueError(f"layout {lay.name} needs {lay.compute_dtype} compute, got {dtype}; "
                         f"drop the compute dtype or choose another layout")
    if isinstance(config, ModelShape) and (sampled_params is not None or ray_per != "model"):
        raise ValueError("a ModelShape fixes the sampled parameters and groups: pass sampled_params "
                         "and ray_per to model_shape() instead")
    shape = config if isinstance(config, ModelShape) else model_shape(
        config, params=sampled_params, ray_per=ray_per)
    context = getattr(shape.config, "n_positions", None) or getattr(shape.config, "max_position_embeddings", None)
    if context is not None and seq > context:
        raise ValueError(f"--seq {seq} exceeds the model's context of {context} tokens")
    a = dtype.itemsize
    per = lay.bytes_per_param(a)
    D = shape.sampled
    notes = []

    # The sampler's buffers (rtllm.state.flat.build_group), from its construction on.
    core = {WEIGHTS: per["compute copy"] * D + a * (shape.frozen + shape.buffers),
            POSITION: per["position"] * D, VELOCITY: per["velocity"] * D, GRADIENTS: per["gradient"] * D}
    # rtllm.samplers.prior keeps the start in the compute copy's dtype, or in x's when x is that copy.
    # The saved start is a clone of the weights the model computes with (rtllm.samplers.prior): the compute
    # copy, the fp32 position on an fp32 model, or fp32-split's bf16 high plane.
    prior = a * D if prior_center == "start" else 0
    backup = (per["position"] + per["velocity"]) * D
    # allocated by the sampler's constructor, with its flat buffers
    smile = {SMILE_START: 4 * D if sampler == "smile" else 0, PRECOND: 12 * D if precondition else 0}
    core.update(smile)
    if undo_backup == "auto":  # SamplingRun._backup_fits, with the memory the state leaves free
        used = sum(core.values()) + prior + (CUDA_CONTEXT_BYTES if cuda else 0)
        undo_backup = gpu_mem_bytes is not None and gpu_mem_bytes - used > (2 if cuda else 4) * backup
    # Host memory: the sample writer's buffers (kept once made) and the checkpoint's staging
    # (rtllm.run.checkpoint copies the state to the host one slice of at most 64 MiB at a time,
    # and reads it back as views of the mapped file; the dt-auto trials park the state so too).
    # On CPU that is the same memory, so there they join the plan.
    host = {SAMPLE_BUFFERS: _sample_buffer_bytes(shape, a, sample_dtype, cuda),
            CKPT_STAGING: min(CHECKPOINT_SLICE_BYTES, backup + prior + (backup if undo_backup else 0)
                              + sum(smile.values()))}
    # Held from just after the construction to the end of the run.
    persistent = {**core, PRIOR: prior, UNDO: backup if undo_backup else 0,
                  NOISE: 0 if cuda else _noise_cache_bytes(shape.shards),
                  SEGMENT_TABLES: segment_table_bytes(shape.shards) if cuda else 0,
                  WORKSPACES: CUDA_WORKSPACE_BYTES if cuda else 0,
                  SAMPLE_BUFFERS: 0 if cuda else host.pop(SAMPLE_BUFFERS)}

    # What each phase adds to the persistent part (the build: to the sampler's buffers alone).
    transients: dict[str, dict[str, int]] = {}
    if not from_meta:  # the loaded weights live until the sampler has copied them (one group)
        transients[BUILD] = {LOADED: a * D}
    accumulator = 4 * D if micro < batch and a != 4 else 0  # rtllm.run.sampling: fp32 sum of bf16 grads
    try:
        act = activation_peak(shape.config, batch=micro, seq=seq, itemsize=a,
                              device="cuda" if cuda else "cpu", checkpointing=checkpointing,
                              checkpoint_every=checkpoint_every, chunk_tokens=chunk_tokens)
        transients[FWD_BWD] = {GRAD_ACC: accumulator, **act.parts}
        known, act_phase = True, act.phase
    except UnknownArchitecture as err:
        notes.append(f"activations not estimated: {err}")
        known, act_phase = False, ""
    if accumulator:  # after each micro-batch: acc += g.float(), one shard at a time
        transients[ACCUMULATE] = {GRAD_ACC: accumulator + 4 * max(n for n, _ in shape.shards)}
    transients[STEP] = {PARTIALS: step_scratch_bytes(shape.shards, "triton" if cuda else "torch", cuda=cuda),
                        PRIOR_TMP: _prior_temporaries(shape.shards, prior_center, a)}
    # SamplingRun._trial parks the sampler state (x, v, the prior center) in a file in OUT while
    # the trials run: disk, not memory (written through the checkpoint's slice staging).
    disk = {DT_SNAPSHOT: backup + prior} if dt_auto else {}
    # A checkpoint or a dt-trial snapshot copies the state to the file slice by slice, as it is
    # (a split position as its two planes: nothing joined on the device); on CPU the slice is
    # staged in the same memory.
    if not cuda:
        transients[CHECKPOINT] = {CKPT_STAGING: host.pop(CKPT_STAGING)}
    totals = {phase: sum((core if phase == BUILD else persistent).values()) + sum(rows.values())
              for phase, rows in transients.items()}
    peak_phase = max(totals, key=totals.get)
    base = core if peak_phase == BUILD else persistent
    components = {row: base.get(row, 0) + transients[peak_phase].get(row, 0) for row in ROWS
                  if known or row not in PARTS}
    components[MARGIN] = math.ceil(FRAGMENTATION * sum(components.values()))
    components[CONTEXT] = CUDA_CONTEXT_BYTES if cuda else 0
    return MemoryPlan(model=shape.name, layout=lay.name, device="cuda" if cuda else "cpu",
                      compute_dtype=str(dtype).removeprefix("torch."), batch=batch, seq=seq,
                      micro_batch=micro, num_params=shape.num_params, sampled_params=D,
                      components=components, persistent=persistent, transients=transients,
                      phase_totals=totals, peak_phase=peak_phase, activation_phase=act_phase,
                      host=host, gpu_mem=gpu_mem_bytes, activations_known=known, notes=tuple(notes),
                      disk=disk)


def plan_all_layouts(config, **kwargs) -> list[MemoryPlan]:
    """One plan per registered layout, the model's shape read once; kwargs as plan_memory."""
    if not isinstance(config, ModelShape):
        config = model_shape(config, params=kwargs.pop("sampled_params", None),
                             ray_per=kwargs.pop("ray_per", "model"))
    kwargs.pop("layout", None)
    asked = kwargs.get("compute_dtype")
    asked = None if asked is None else str(_compute_dtype(asked, True)).removeprefix("torch.")
    # A layout tied to another compute dtype than the one asked for cannot run it: not planned.
    # MCLMC and SMILE run the fp32 layout only (their drift undo and step-start copy are fp32 x).
    fp32_only = kwargs.get("sampler", "ray") != "ray"
    return [plan_memory(config, layout=name, **kwargs) for name, lay in LAYOUTS.items()
            if (asked is None or lay.compute_dtype in (None, asked)) and not (fp32_only and name != "fp32")]


def kernel_partials_bytes(shards, backend: str, *, cuda: bool = False) -> int:
    """The largest partial-sum buffer of one shard's reduce pass; shards: [(elements, offset)].

    triton: one reduce launch per kind of shard (rtllm.state.segment_launch; the kind is
    offset % 4 here, the sampled parameters sharing their dtypes): [blocks, 6] fp32 partials over
    the kind's shards and their float64 copy for the per-shard sums, a block being BLOCK global
    elements aligned to the Philox quad grid (rtllm/kernels/triton_segments.py). torch: the per-task
    [pieces, 6] fp32 stacks and their concatenation, a piece being the shard's part of one CHUNK
    of the global index.
    """
    if backend == "triton":
        from rtllm.kernels import BLOCK

        blocks: dict[int, int] = {}
        for n, off in shards:
            blocks[off % 4] = blocks.get(off % 4, 0) + -(-(n + off % 4) // BLOCK)
        return max(_block(b * 6 * 4, cuda) + _block(b * 6 * 8, cuda) for b in blocks.values())
    from rtllm.state.backends import CHUNK

    return max(2 * (-(-(off + n) // CHUNK) - off // CHUNK) * 6 * 4 for n, off in shards)


def segment_table_bytes(shards) -> int:
    """The tables of the Triton segment launches (rtllm.state.segment_launch, kept while the
    shards stay): per kind of shard, an int64 row of _COLUMNS and the block count per shard, and
    two int32 per program (its shard, its block). CUDA blocks of 512 bytes."""
    from rtllm.kernels import BLOCK
    from rtllm.kernels.triton_segments import _COLUMNS

    kinds: dict[int, list[int]] = {}
    for n, off in shards:
        if n:
            kinds.setdefault(off % 4, []).append(-(-(n + off % 4) // BLOCK))
    return sum(_block(len(b) * _COLUMNS * 8, True) + _block(len(b) * 8, True) + 2 * _block(sum(b) * 4, True)
               for b in kinds.values())


def step_scratch_bytes(shards, backend: str, *, cuda: bool = False) -> int:
    """Peak scratch of the sampler step: partial sums, every shard's float64 sums and their
    stack, and for the torch backend the buffers that redraw noise the cache does not hold."""
    sums = len(shards) * _block(6 * 8, cuda) + _block(len(shards) * 6 * 8, cuda)
    scratch = kernel_partials_bytes(shards, backend, cuda=cuda) + sums
    if backend == "torch" and _noise_cache_bytes(shards) < 4 * sum(n for n, _ in shards):
        from rtllm.state.backends import CHUNK, UPDATE_SLICE

        # reduce: a chunk-sized draw per worker thread; update: one slice-sized buffer
        scratch += max(2 * torch.get_num_threads() * CHUNK * 4, 4 * min(UPDATE_SLICE, max(n for n, _ in shards)))
    return scratch


def _block(nbytes: int, cuda: bool) -> int:
    return -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK if cuda else nbytes


def _noise_cache_bytes(shards) -> int:
    """The torch backend caches fp32 noise for shards in order, up to NOISE_CACHE_MAX elements."""
    from rtllm.state.backends import NOISE_CACHE_MAX

    held = 0
    for n, _ in shards:
        if held + n <= NOISE_CACHE_MAX:
            held += n
    return 4 * held


def _prior_temporaries(shards, center: str | None, a: int) -> int:
    """rtllm.samplers.prior.add_gradient_: per chunk, x - center in fp32 and its cast to the gradient's dtype."""
    if center is None:
        return 0
    from rtllm.samplers.prior import _CHUNK

    n = min(_CHUNK, max(s for s, _ in shards))
    cast = a * n if a != 4 else 0
    return cast if center == "zero" else (4 * n if a != 4 else 0) + 4 * n + cast


def _sample_buffer_bytes(shape: ModelShape, a: int, sample_dtype: str, cuda: bool) -> int:
    """SampleWriter's host buffers, pinned at their exact size (rtllm.store.pinned)."""
    from rtllm.store.writer import SampleWriter

    pending = inspect.signature(SampleWriter.__init__).parameters["max_pending"].default
    one = shape.sample_numel * (4 if sample_dtype == "fp32" else a)
    return pending * one


# -- inputs ------------------------------------------------------------------------------------------
def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    return value


def _device_kind(device: str) -> str:
    kind = str(device).split(":")[0]
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    return kind


def _compute_dtype(value, cuda: bool) -> torch.dtype:
    if value is None:
        return torch.bfloat16 if cuda else torch.float32
    if isinstance(value, torch.dtype):
        return value
    if str(value) in _DTYPES:
        return _DTYPES[str(value)]
    raise ValueError(f"compute dtype {value!r} is not one of {', '.join(_DTYPES)}")

