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
The kept offsets are held in host memory (kept x D x 4 bytes) for the fit.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from rtllm.run.fiber_config import FiberConfig
from rtllm.lm.data import MinibatchOrder, TokenData, context_length, read_texts
from rtllm.lm.loss import lm_loss
from rtllm.lm.model_io import load_model_and_tokenizer, prepare_for_sampling, resolve_device, select_parameters
from rtllm.samplers.fiber import FiberWalk
from rtllm.samplers.fiber_map import fit_mlp_map, fit_pca_map
from rtllm.store.manifest import RUN_MARKER, atomic_write_json
from rtllm.store.writer import SampleWriter, copy_tokenizer

SUMMARY = "fiber.json"


def flat_position(walk: FiberWalk) -> torch.Tensor:
    """The sampled parameters as one fp32 vector on the host (shard order)."""
    return torch.cat([s.position().detach().to("cpu", torch.float32) for s in walk.shards])


def set_flat_position(walk: FiberWalk, vector: torch.Tensor) -> None:
    start = 0
    for shard in walk.shards:
        shard.set_position(vector[start:start + shard.numel].to(shard.x.device))
        start += shard.numel


class FiberRun:
    def __init__(self, cfg: FiberConfig, *, overwrite: bool = False, log: Callable[[str], None] = print) -> None:
        self.cfg, self.say = cfg, log
        out = cfg.out_dir
        if out.exists() and any(out.iterdir()):
            if not overwrite:
                raise ValueError(f"--out {out} is not empty: pass --overwrite to replace it")
            if not (out / RUN_MARKER).exists():
                raise ValueError(f"--out {out} is not empty and holds no rtllm run ({RUN_MARKER}); "
                                 f"choose another directory")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_MARKER).write_text(json.dumps({"method": "fiber", **asdict(cfg)}, indent=2))
        self.device = resolve_device(cfg.device)
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

    def walk_particles(self) -> tuple[list[torch.Tensor], list[dict]]:
        cfg, limit = self.cfg, self.start_loss + self.cfg.tolerance
        kept, particles, cursor = [], [], 0
        with self._writer("walk", {}) as writer:
            for i in range(cfg.particles):
                set_flat_position(self.walk, self.start)
                self.walk.particle = i
                record = {"particle": i, "kept": 0, "pullbacks": 0, "stopped_at": None, "gradients": 0}
                pulling = 0
                for t in range(cfg.steps):
                    self._gradient(cursor)
                    cursor += 1
                    record["gradients"] += 1
                    self.walk.step(drift=pulling == 0)
                    if pulling == 0 and (t + 1) % cfg.thin:
                        continue
                    loss = self.eval_loss()
                    if loss <= limit:
                        pulling = 0
                        if (t + 1) % cfg.thin == 0:
                            writer.submit(index=len(kept), chain=0, step=i * cfg.steps + t + 1, loss=None,
                                          heldout_loss=loss)
                            writer.wait_snapshot()  # the next step must not overwrite it mid-copy
                            kept.append(flat_position(self.walk) - self.start)
                            record["kept"] += 1
                    else:
                        record["pullbacks"] += pulling == 0
                        pulling += 1
                        if pulling > cfg.max_pullback:
                            record["stopped_at"] = t + 1
                            break
                particles.append(record)
                self.say(f"particle {i}: kept {record['kept']} iterates, {record['pullbacks']} pull-backs"
                         + (f", stopped at step {record['stopped_at']}" if record["stopped_at"] else ""))
        return kept, particles

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
        kept, particles = self.walk_particles()
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


def fiber(cfg: FiberConfig, *, overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Walk, fit, generate: the Python API of `rtllm fiber`; returns the output directory."""
    return FiberRun(cfg, overwrite=overwrite, log=log).run()
