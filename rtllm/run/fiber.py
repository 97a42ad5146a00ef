"""`rtllm fiber`: walk K particles along the fiber of a trained LM, fit a map, write two ensembles.

A reconstruction of "Walking on the fiber" (docs/fiber.md). From the given weights (the MAP),
particle i takes `steps` walk steps (`rtllm.samplers.fiber.FiberWalk`) on minibatches. Every
`thin` steps its loss on a fixed held-out evaluation batch is compared with the start's: an
iterate within `tolerance` nats is kept; one outside starts a pull-back -- gradient steps without
drift, each checked on the evaluation batch -- and a particle not back within `max_pullback`
steps is stopped (our choice; the paper's handling is not known). Then a map (`pca` or `mlp`,
`rtllm.samplers.fiber_map`) is fitted to the kept offsets and `generated` samples are drawn
from it, each scored on held-out text.

Output (each an ordinary ensemble directory that `rtllm evaluate` reads):
    OUT/walk/        the kept walk iterates
    OUT/generated/   the map's samples (all of them; `inside_tolerance` in fiber.json counts them)
    OUT/fiber.json   settings, start loss, kept counts per particle, generated losses
    OUT/particles/particle-NNN/  each particle's kept positions (kept.safetensors) and record
                     (particle.json, written last: the particle is done)
The kept positions are held in host memory (kept x D x 4 bytes) for the fit.

Particles are independent: particle i walks minibatches i*steps, i*steps + 1, ... with its own
drift stream, so it does not matter which process walks it or when. Under torchrun, rank r of W
walks the particles i = r (mod W) (its own device, as `rtllm sample`'s chains); rank 0 then waits
for every particle's record and writes walk/, generated/ and fiber.json. `--resume` keeps the
particles already done and walks the others again from the start: the output equals an
uninterrupted run's.
"""
from __future__ import annotations

import datetime
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from safetensors.torch import load_file, save_file

from rtllm.run.chains import Launch, rank_device
from rtllm.run.fiber_config import FiberConfig
from rtllm.lm.data import MinibatchOrder, TokenData, context_length, read_texts
from rtllm.lm.loss import lm_loss
from rtllm.lm.model_io import load_model_and_tokenizer, prepare_for_sampling, resolve_device, select_parameters
from rtllm.samplers.fiber import FiberWalk
from rtllm.samplers.fiber_map import fit_mlp_map, fit_pca_map
from rtllm.store.manifest import RUN_MARKER, atomic_write_json
from rtllm.store.writer import SampleWriter, copy_tokenizer

SUMMARY = "fiber.json"
PARTICLES = "particles"
WAIT_POLL_S = 0.5


def flat_position(walk: FiberWalk) -> torch.Tensor:
    """The sampled parameters as one fp32 vector on the host (shard order)."""
    return torch.cat([s.position().detach().to("cpu", torch.float32) for s in walk.shards])


def set_flat_position(walk: FiberWalk, vector: torch.Tensor) -> None:
    start = 0
    for shard in walk.shards:
        shard.set_position(vector[start:start + shard.numel].to(shard.x.device))
        start += shard.numel


def particle_dir(out: Path, i: int) -> Path:
    return out / PARTICLES / f"particle-{i:03d}"


def _marker(cfg: FiberConfig) -> dict:
    return {"method": "fiber", **{k: v for k, v in asdict(cfg).items() if k != "device"}}


def claim_out(cfg: FiberConfig, *, overwrite: bool, resume: bool) -> None:
    """Make --out ready: a fresh run's directory, or the same run's to resume."""
    out, marker = cfg.out_dir, _marker(cfg)
    if resume:
        if not (out / RUN_MARKER).exists():
            raise ValueError(f"--resume: {out} holds no rtllm fiber run ({RUN_MARKER}); drop --resume")
        saved = json.loads((out / RUN_MARKER).read_text())
        saved = {k: list(v) if isinstance(v, tuple) else v for k, v in saved.items() if k != "device"}
        want = json.loads(json.dumps(marker))
        diff = sorted(k for k in saved.keys() | want.keys() if saved.get(k) != want.get(k))
        if diff:
            raise ValueError(f"--resume: {out} was started with other settings ({', '.join(diff)}); "
                             f"resume with the same command line, or start afresh with --overwrite")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out} is not empty: pass --overwrite to replace it, or --resume to continue it")
        if not (out / RUN_MARKER).exists():
            raise ValueError(f"--out {out} is not empty and holds no rtllm run ({RUN_MARKER}); "
                             f"choose another directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).write_text(json.dumps(marker, indent=2))


def _barrier(launch: Launch) -> None:
    """The one collective: the ranks start once rank 0 has made --out ready (gloo, a few bytes)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size,
                            timeout=datetime.timedelta(minutes=10))
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


class FiberRun:
    def __init__(self, cfg: FiberConfig, *, overwrite: bool = False, resume: bool = False,
                 log: Callable[[str], None] = print, launch: Launch | None = None) -> None:
        self.cfg, self.say = cfg, log
        self.rank, self.world = (0, 1) if launch is None else (launch.rank, launch.world_size)
        out = cfg.out_dir
        error = None
        if self.rank == 0:
            try:
                claim_out(cfg, overwrite=overwrite, resume=resume)
            except ValueError as err:
                error = err
        if launch is not None:
            _barrier(launch)
        if error is not None:
            raise error
        if not (out / RUN_MARKER).exists():
            raise ValueError(f"rank 0 could not make {out} ready (see its error)")
        self.device = resolve_device(rank_device(cfg.device, launch))
        self.model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=torch.float32, device=self.device)
        prepare_for_sampling(self.model)
        self.data = TokenData.from_texts(tokenizer, read_texts(cfg.train),
                                         heldout=read_texts(cfg.heldout) if cfg.heldout else None,
                                         seq_len=cfg.seq_len, context=context_length(self.model))
        if len(self.data.heldout) < 1:
            raise ValueError("no held-out sequences: give --heldout text or more --train text")
        self.order = MinibatchOrder(len(self.data.train), cfg.batch_size, cfg.seed)
        sampled, _ = select_parameters(self.model, None)
        self.walk = FiberWalk([p for _, p in sampled], lr=cfg.lr, drift=cfg.drift, seed=cfg.seed,
                              tangent=cfg.tangent)
        self.eval_batch = self.data.heldout[:cfg.eval_sequences].to(self.device)
        self.start = flat_position(self.walk)
        self.start_loss = self.eval_loss()
        if not math.isfinite(self.start_loss):
            raise ValueError(f"the loss is {self.start_loss} at the starting weights: check the model and text")
        if self.rank == 0:
            copy_tokenizer(cfg.model, out / "walk")
            copy_tokenizer(cfg.model, out / "generated")

    @torch.no_grad()
    def eval_loss(self) -> float:
        return float(lm_loss(self.model, self.eval_batch[:, :-1], self.eval_batch[:, 1:]))

    def _gradient(self, cursor: int) -> float:
        seqs = self.data.train[self.order.batch(cursor)].to(self.device)
        self.walk.zero_grad()
        loss = lm_loss(self.model, seqs[:, :-1], seqs[:, 1:])
        loss.backward()
        return float(loss.detach())

    def _writer(self, name: str, extra: dict) -> SampleWriter:
        config = {"method": "fiber", "ensemble": name, **asdict(self.cfg), **extra,
                  "num_params": self.walk.num_params, "start_loss": self.start_loss}
        return SampleWriter.from_model(self.cfg.out_dir / name, self.model, sample_dtype=None, run_config=config)

    def walk_particle(self, i: int) -> None:
        """Walk particle i from the start; save its kept positions, then its record (done)."""
        cfg, limit = self.cfg, self.start_loss + self.cfg.tolerance
        set_flat_position(self.walk, self.start)
        self.walk.particle = i
        record = {"particle": i, "kept": 0, "pullbacks": 0, "stopped_at": None, "gradients": 0,
                  "steps": [], "heldout_losses": []}
        kept, pulling, cursor = [], 0, i * cfg.steps
        for t in range(cfg.steps):
            self._gradient(cursor + t)
            record["gradients"] += 1
            self.walk.step(drift=pulling == 0)
            if pulling == 0 and (t + 1) % cfg.thin:
                continue
            loss = self.eval_loss()
            if loss <= limit:
                pulling = 0
                if (t + 1) % cfg.thin == 0:
                    kept.append(flat_position(self.walk))
                    record["kept"] += 1
                    record["steps"].append(i * cfg.steps + t + 1)
                    record["heldout_losses"].append(loss)
            else:
                record["pullbacks"] += pulling == 0
                pulling += 1
                if pulling > cfg.max_pullback:
                    record["stopped_at"] = t + 1
                    break
        pdir = particle_dir(self.cfg.out_dir, i)
        if pdir.exists():
            shutil.rmtree(pdir)  # an unfinished earlier attempt
        pdir.mkdir(parents=True)
        save_file({"kept": torch.stack(kept) if kept else torch.zeros(0, self.walk.num_params)},
                  str(pdir / "kept.safetensors"))
        atomic_write_json(pdir / "particle.json", record)
        self.say(f"particle {i}: kept {record['kept']} iterates, {record['pullbacks']} pull-backs"
                 + (f", stopped at step {record['stopped_at']}" if record["stopped_at"] else ""))

    def walk_particles(self) -> None:
        """This process's particles (i = rank mod world), skipping those already done."""
        for i in range(self.rank, self.cfg.particles, self.world):
            if (particle_dir(self.cfg.out_dir, i) / "particle.json").exists():
                self.say(f"particle {i}: done in an earlier run, kept")
                continue
            self.walk_particle(i)

    def collect(self) -> tuple[list[torch.Tensor], list[dict]]:
        """Rank 0: wait for every particle, write their kept iterates as OUT/walk."""
        records = []
        for i in range(self.cfg.particles):
            done = particle_dir(self.cfg.out_dir, i) / "particle.json"
            while not done.exists():  # walked by another rank (torchrun stops all if one dies)
                time.sleep(WAIT_POLL_S)
            records.append(json.loads(done.read_text()))
        kept = []
        with self._writer("walk", {}) as writer:
            for record in records:
                positions = load_file(str(particle_dir(self.cfg.out_dir, record["particle"]) / "kept.safetensors"))["kept"]
                for pos, step, loss in zip(positions, record["steps"], record["heldout_losses"]):
                    set_flat_position(self.walk, pos)
                    writer.submit(index=len(kept), chain=0, step=step, loss=None, heldout_loss=loss)
                    writer.wait_snapshot()  # the next position must not overwrite it mid-copy
                    kept.append(pos - self.start)
        set_flat_position(self.walk, self.start)
        return kept, [{k: v for k, v in r.items() if k not in ("steps", "heldout_losses")} for r in records]

    def generate(self, kept: list[torch.Tensor]) -> dict:
        cfg = self.cfg
        if cfg.map == "none" or cfg.generated == 0:
            return {"map": "none"}
        if len(kept) <= cfg.rank:
            raise ValueError(f"{len(kept)} kept iterates cannot fit a rank-{cfg.rank} map: lower --rank, or "
                             f"walk longer / with more particles / a larger --tolerance")
        offsets = torch.stack(kept)
        fitted = fit_pca_map(offsets, cfg.rank) if cfg.map == "pca" else fit_mlp_map(offsets, cfg.rank, seed=cfg.seed)
        draws = fitted.sample(cfg.generated, torch.Generator().manual_seed(cfg.seed))
        losses = []
        with self._writer("generated", {"map_rank": cfg.rank}) as writer:
            for j, offset in enumerate(draws):
                set_flat_position(self.walk, self.start + offset)
                losses.append(self.eval_loss())
                writer.submit(index=j, chain=0, step=0, loss=None, heldout_loss=losses[-1])
                writer.wait_snapshot()
        set_flat_position(self.walk, self.start)
        inside = sum(loss <= self.start_loss + cfg.tolerance for loss in losses)
        scales = fitted.pca.scales if cfg.map == "mlp" else fitted.scales
        return {"map": cfg.map, "rank": cfg.rank, "scales": [float(s) for s in scales],
                "heldout_losses": losses, "inside_tolerance": inside, "fraction_inside": inside / len(losses)}

    def run(self) -> Path:
        self.walk_particles()
        if self.rank != 0:
            self.say(f"rank {self.rank}: particles done; rank 0 writes the ensembles")
            return self.cfg.out_dir
        kept, particles = self.collect()
        generated = self.generate(kept)
        summary = {"settings": asdict(self.cfg), "start_loss": self.start_loss, "kept": len(kept),
                   "gradients": sum(p["gradients"] for p in particles), "particles": particles,
                   "generated": generated}
        atomic_write_json(self.cfg.out_dir / SUMMARY, summary)
        if "fraction_inside" in generated:
            self.say(f"generated {len(generated['heldout_losses'])} samples from the {generated['map']} map: "
                     f"{generated['fraction_inside']:.0%} within {self.cfg.tolerance} nats of the start")
        self.say(f"done: {len(kept)} walk samples in {self.cfg.out_dir / 'walk'}, summary {self.cfg.out_dir / SUMMARY}")
        return self.cfg.out_dir


def fiber(cfg: FiberConfig, *, overwrite: bool = False, resume: bool = False,
          log: Callable[[str], None] = print) -> Path:
    """Walk, fit, generate: the Python API of `rtllm fiber`; returns the output directory.
    Under torchrun (RANK, WORLD_SIZE set) the particles are shared out over the ranks."""
    return FiberRun(cfg, overwrite=overwrite, resume=resume, log=log, launch=Launch.from_env()).run()
