"""`rtllm sample --shard-state`: one chain over the W ranks of a torchrun launch.

- The model is FSDP2-sharded (rtllm.lm.fsdp) and the sampler runs on the local shards
  (rtllm.state.sharded): one int64 all-reduce per sampler step, noise keyed on the global index.
- Data parallel: rank r takes the r-th of W equal parts of every minibatch (one forward and
  backward per rank per step), scaled by its share; FSDP sums the gradients in float64. On one
  process, `--shard-state --micro-batch B/W` takes the same parts in turn and sums their
  gradients in float64: the same chain, bit for bit (docs/sharding.md says when and why).
- Losses: each rank's part, all-gathered and summed in rank order (the one-process order).
- Checkpoints: rank 0 in the run's own checkpoint file, rank r > 0 in OUT/ranks/rank-RR/; each
  keeps its previous one too, so after a kill that caught one rank mid-write, `--resume` takes
  the newest step every rank has. The world size is recorded: resuming with another is refused.
- Samples: gathered a tensor at a time (DTensor.full_tensor) into rank 0's host copy, written by
  rank 0 as ordinary Hugging Face directories; other ranks write none.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from rtllm.lm.fsdp import shard_model
from rtllm.lm.loss import naive_lm_loss
from rtllm.lm.model_io import select_parameters
from rtllm.run.chains import Launch, check_gathered, rank_device
from rtllm.run.config import SampleConfig, chain_seed
from rtllm.run.sampler_setup import build_sampler
from rtllm.run.sampling import SamplingRun, prepare_out_dir
from rtllm.state.sharded import ShardedState
from rtllm.store.writer import SampleWriter

RANKS_DIR = "ranks"
GROUP_TIMEOUT_S = 1800


def rank_out_dir(out: Path, rank: int) -> Path:
    """Where rank `rank` keeps its checkpoint and log (rank 0: the run directory itself)."""
    return Path(out) if rank == 0 else Path(out) / RANKS_DIR / f"rank-{rank:02d}"


class ShardedSamplingRun(SamplingRun):
    """A SamplingRun whose model and sampler state are sharded over the default process group
    (or, without one, the same exact-sum chain on one process)."""

    def __init__(self, cfg: SampleConfig, *, held_lock=None, **kwargs) -> None:
        self._held_lock = held_lock  # under torchrun: rank 0 claimed the output directory for all
        self.distributed = dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        parts = cfg.batch_size // (cfg.micro_batch or cfg.batch_size)
        if self.distributed and (cfg.batch_size % self.world or parts not in (1, self.world)):
            raise ValueError(f"--shard-state over {self.world} ranks: --batch-size "
                             f"({cfg.batch_size}) must be a multiple of the rank count, and "
                             f"--micro-batch unset or batch/ranks ({cfg.batch_size // self.world})")
        self.parts = self.world if self.distributed else parts
        super().__init__(cfg, **kwargs)
        self.state["world_size"] = self.world

    # -- set-up -----------------------------------------------------------------------------
    def _claim_out_dir(self, resume: bool, overwrite: bool):
        if not self.distributed:
            return super()._claim_out_dir(resume, overwrite)
        self.cfg.out_dir.mkdir(parents=True, exist_ok=True)  # rank r > 0: OUT/ranks/rank-RR
        return self._held_lock or _NotHeld()

    def _build_sampler(self, sampled: list):
        if self.distributed:
            shard_model(self.model)
            sampled, _ = select_parameters(self.model, self.cfg.params)  # now DTensors
        return build_sampler(self.cfg, sampled, self.scale, chain_seed(self.cfg.seed, self.cfg.chain),
                             sharded=ShardedState())

    def _make_writer(self):
        self._gather_plan = self._host_copies()
        return _GatheringWriter(self, super()._make_writer() if self.rank == 0 else None)

    def _host_copies(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(live tensor, rank 0's host copy) per distinct state-dict tensor, in state-dict order."""
        plan, self._host = {}, {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            if id(t) not in plan:  # tied names share one tensor, gathered once
                plan[id(t)] = (t, torch.empty(t.shape, dtype=t.dtype) if self.rank == 0 else None)
            self._host[name] = plan[id(t)][1]
        return list(plan.values())

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        """Rank 0's host copies of the full tensors, filled by gather_sample at each sample."""
        return self._host

    @torch.no_grad()
    def gather_sample(self) -> None:
        """Every rank: all-gather each tensor in turn; rank 0 keeps it in its host copy."""
        for live, host in self._gather_plan:
            full = live.full_tensor() if hasattr(live, "full_tensor") else live
            if self.rank == 0:
                host.copy_(full.detach())

    # -- losses -----------------------------------------------------------------------------
    def _my_parts(self, seqs: torch.Tensor) -> list[torch.Tensor]:
        parts = list(seqs.chunk(self.parts))
        return [parts[self.rank]] if self.distributed else parts

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """The float64 sum of each rank's value, in rank order (the one-process order)."""
        if not self.distributed:
            return value
        gathered = [torch.empty_like(value) for _ in range(self.world)]
        dist.all_gather(gathered, value)
        total = torch.zeros_like(value)
        for g in gathered:
            total += g
        return total

    @torch.no_grad()
    def _batch_loss(self, cursor: int) -> torch.Tensor:
        seqs = self._minibatch(cursor)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for part in self._my_parts(seqs):
            total += naive_lm_loss(self.model, part[:, :-1], part[:, 1:]).double() * (len(part) / len(seqs))
        return self._sum_over_ranks(total)

    @torch.no_grad()
    def heldout_loss(self) -> float:
        from rtllm.run.sampling import HELDOUT_EVAL_SEQUENCES

        seqs = self.data.heldout[:HELDOUT_EVAL_SEQUENCES].to(self.device)
        return float(naive_lm_loss(self.model, seqs[:, :-1], seqs[:, 1:]))

    def _loss_and_grad_on_device(self, cursor: int) -> tuple[torch.Tensor, int]:
        seqs = self._minibatch(cursor)
        self.sampler.zero_grad()
        shards = self.sampler.shards
        # one process, several parts: their gradients summed in float64 and rounded once, as
        # FSDP's float64 reduce-scatter sums the ranks' gradients (rtllm.lm.fsdp)
        acc = [torch.zeros_like(s.g, dtype=torch.float64) for s in shards] \
            if not self.distributed and self.parts > 1 else None
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for part in self._my_parts(seqs):
            loss = naive_lm_loss(self.model, part[:, :-1], part[:, 1:]) * (len(part) / len(seqs))
            loss.backward()
            total += loss.detach().double()
            if acc is not None:
                for a, s in zip(acc, shards):
                    a.add_(s.g)
                    s.g.zero_()
        if acc is not None:
            for a, s in zip(acc, shards):
                s.g.copy_(a)
        return self._sum_over_ranks(total), seqs[:, 1:].numel()

    # -- checkpoints ------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        previous = _previous(self.ckpt_path)
        if self.ckpt_path.exists():
            os.replace(self.ckpt_path, previous)  # kept until every rank has the new one
        super()._save_checkpoint()

    def _load_checkpoint(self) -> None:
        from rtllm.run.checkpoint import load_checkpoint

        mine = {}
        for path in (self.ckpt_path, _previous(self.ckpt_path)):
            ckpt = load_checkpoint(path)
            if ckpt is not None:
                mine[ckpt["state"]["step"]] = (path, ckpt["state"].get("world_size"))
        worlds = {w for _, w in mine.values()}
        everyone = [None] * self.world
        if self.distributed:
            dist.all_gather_object(everyone, {"steps": sorted(mine), "worlds": sorted(worlds)})
        else:
            everyone = [{"steps": sorted(mine), "worlds": sorted(worlds)}]
        seen = {w for e in everyone for w in e["worlds"]}
        if seen - {self.world}:
            raise ValueError(world_mismatch(self.cfg.out_dir, sorted(seen - {self.world})[0], self.world))
        common = set(everyone[0]["steps"]).intersection(*(e["steps"] for e in everyone))
        if not common:
            if any(e["steps"] for e in everyone):
                raise ValueError(f"--resume: the ranks' checkpoints in {self.cfg.out_dir} share no "
                                 f"step ({[e['steps'] for e in everyone]}); start anew with --overwrite")
            self.say(f"--resume: no checkpoint in {self.cfg.out_dir}, starting fresh")
            return
        chosen_path = mine[max(common)][0]
        real = self.ckpt_path
        self.ckpt_path = chosen_path  # the base class loads (and checks) the file at ckpt_path
        try:
            super()._load_checkpoint()
        finally:
            self.ckpt_path = real


def world_mismatch(out: Path, recorded: int, world: int) -> str:
    return (f"--resume: the checkpoints in {out} are of a chain over {recorded} rank(s), this "
            f"launch has {world}: resume with the same number of ranks (--nproc-per-node), or "
            f"start anew with --overwrite")


def recorded_worlds(out: Path, rank: int, chain: int) -> list[int]:
    """The rank counts recorded in rank `rank`'s checkpoints (their headers only)."""
    from rtllm.run.checkpoint import checkpoint_path, read_run_state

    path = checkpoint_path(rank_out_dir(out, rank), chain)
    states = [read_run_state(p) for p in (path, _previous(path)) if p.exists()]
    return sorted({s["world_size"] for s in states if s and isinstance(s.get("world_size"), int)})


def equal_one_process_command(argv: list[str] | None, cfg: SampleConfig, world: int) -> str:
    """The one-process command line whose chain a launch over `world` ranks reproduces bit for bit:
    the same options with --micro-batch B/W (and --shard-state: the exact sums)."""
    import shlex

    kept, skip = [], False
    for a in argv or ["sample", "...", "--shard-state"]:
        if skip:
            skip = False
        elif a in ("--micro-batch", "--resume", "--overwrite") or a.startswith("--micro-batch="):
            skip = a == "--micro-batch"
        else:
            kept.append(a)
    return shlex.join(["rtllm", *kept, "--micro-batch", str(cfg.batch_size // world)])


class _NotHeld:
    """Ranks > 0 hold no lock of their own: rank 0's lock on OUT covers OUT/ranks/ too."""

    def release(self) -> None:
        pass


def _previous(path: Path) -> Path:
    return path.with_name(path.stem + ".previous" + path.suffix)


class _GatheringWriter:
    """The run's sample writer on rank 0, nothing elsewhere; every rank gathers at a sample."""

    def __init__(self, run: ShardedSamplingRun, inner: SampleWriter | None) -> None:
        self.run, self.inner = run, inner

    def submit(self, **kwargs) -> None:
        if self.inner is not None:
            self.inner.wait_snapshot()  # the host copy is about to be overwritten
        self.run.gather_sample()
        if self.inner is not None:
            self.inner.submit(**kwargs)

    @property
    def pending(self) -> int:  # a value, not a method: __getattr__ below would hand out a lambda
        return self.inner.pending if self.inner is not None else 0

    def __getattr__(self, name):  # flush, wait_snapshot, update_config: rank 0's, else nothing
        if self.inner is not None:
            return getattr(self.inner, name)
        return lambda *args, **kwargs: None

    def __enter__(self):
        if self.inner is not None:
            self.inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.inner is not None:
            self.inner.__exit__(*exc)


def run_sharded(cfg: SampleConfig, *, launch: Launch | None, resume: bool, overwrite: bool,
                log: Callable[[str], None] = print, argv: list[str] | None = None) -> Path:
    """One sharded chain in cfg.out over the torchrun launch (or on this process alone).
    argv: the command line (without the program), for the line that names the equal
    one-process command."""
    if launch is None:
        ShardedSamplingRun(cfg, resume=resume, overwrite=overwrite, log=log).run()
        return cfg.out_dir
    if launch.restart_count > 0:  # torchrun restarted the group after a failure
        resume, overwrite = True, False
    error = None
    try:
        if cfg.out_dir.exists() and any(cfg.out_dir.iterdir()) and not (resume or overwrite):
            raise ValueError(f"--out {cfg.out_dir} is not empty: pass --resume to continue its run "
                             f"or --overwrite to replace it")
    except ValueError as e:
        error = str(e)
    device = rank_device(cfg.device, launch)
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    owned = not dist.is_initialized()  # a program that set up torch.distributed keeps its group
    if owned:
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        # every rank the same settings, or every rank the same error (as rtllm.run.chains.handshake)
        gathered: list = [None] * launch.world_size
        dist.all_gather_object(gathered, {"settings": {**cfg.to_json(), "resume": resume,
                                                       "overwrite": overwrite}, "error": error})
        check_gathered(gathered)
        if resume:  # another rank count: refused on every rank before anything is touched
            worlds: list = [None] * launch.world_size
            dist.all_gather_object(worlds, recorded_worlds(cfg.out_dir, launch.rank, cfg.chain))
            other = sorted({w for ws in worlds for w in ws} - {launch.world_size})
            if other:
                raise ValueError(world_mismatch(cfg.out_dir, other[0], launch.world_size))
        lock = prepare_out_dir(cfg, resume, overwrite) if launch.rank == 0 else None
        dist.barrier()
        # the chain is that of one process taking the ranks' parts as micro-batches: say so
        rcfg = dataclasses.replace(cfg, out=str(rank_out_dir(cfg.out_dir, launch.rank)), device=device,
                                   micro_batch=cfg.micro_batch or cfg.batch_size // launch.world_size)
        say = log if launch.rank == 0 else (lambda m: None)
        say(f"one chain over {launch.world_size} ranks, {rcfg.micro_batch} of the {cfg.batch_size} "
            f"sequences of each minibatch on each: bit for bit the chain of one process running "
            f"`{equal_one_process_command(argv, cfg, launch.world_size)}` (docs/sharding.md)")
        # the directory is prepared: a fresh run finds it empty, a resumed one its checkpoints
        ShardedSamplingRun(rcfg, resume=True, overwrite=False, log=say, held_lock=lock).run()
        dist.barrier()
    finally:
        if owned:
            dist.destroy_process_group()
    return cfg.out_dir
