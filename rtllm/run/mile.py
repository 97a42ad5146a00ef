"""MILE (Sommer et al., ICLR 2025): deep-ensemble members, each sampled by a tuned MCLMC chain.

1. K members are trained from the checkpoint (or from scratch) under their own seeds and data
   orders, with early stopping on held-out NLL (`rtllm.run.members`);
2. each member starts its own chain: MCLMC's step size and L are tuned (phases I-III,
   `rtllm.samplers.mclmc_tune`) during the burn-in, then the chain is sampled and thinned;
3. the chains are written into one ensemble directory (`DIR/chains/chain-K`, chain id = member)
   and merged (`rtllm.run.merge`), so `rtllm evaluate` and `rtllm.Ensemble` read the result.

Under torchrun, rank r handles members r, r + W, r + 2W, ...; without it one process handles
them all in turn. Every stage resumes: a finished member is reused, a chain continues from its
last checkpoint. The MCLMC tuning at the start of a chain's burn-in writes no checkpoint: a run
killed during it tunes again from the chain's start (deterministically, to the same result). Layout: DIR/members/member-K (save_pretrained directories), DIR/chains/, DIR/ensemble.json.

The paper uses full-batch gradients; here the gradient is a minibatch one (the full batch of
an LM corpus does not fit a step), so the energy-based tuning sees minibatch noise too. That
is the documented difference (docs/sampling.md, "MILE").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rtllm.run.config import SampleConfig
from rtllm.run.config import MemberTraining
from rtllm.run.members import train_member

MEMBERS = "members"
MINIBATCH_WARNING = ("MILE here uses minibatch gradients (the paper uses full-batch ones): the "
                     "step-size tuning and the chain see minibatch noise; larger --batch-size "
                     "brings it closer to the paper")


def member_dir(out_dir: Path | str, member: int) -> Path:
    return Path(out_dir) / MEMBERS / f"member-{member:03d}"


@dataclass(frozen=True)
class MileConfig:
    """K members (stage 1) and the sampling settings every member's chain shares (stage 2).

    `sampling` holds the chain settings (sampler 'mclmc' as in the paper, or 'ray': multi-start
    ray tracing, `rtllm sample --starts K`; model, out, chain and init are set per member);
    `training` how members are trained.
    """

    members: int
    sampling: SampleConfig
    training: MemberTraining = field(default_factory=MemberTraining)

    def __post_init__(self) -> None:
        if isinstance(self.members, bool) or not isinstance(self.members, int) or self.members < 1:
            raise ValueError(f"--members must be an integer >= 1 (the paper uses 12), got {self.members!r}")
        if self.sampling.sampler not in ("mclmc", "ray"):
            raise ValueError(f"MILE samples with MCLMC or ray tracing; the sampling config says "
                             f"{self.sampling.sampler!r}")


def _my_members(k: int, launch) -> list[int]:
    if launch is None:
        return list(range(k))
    return list(range(launch.rank, k, launch.world_size))


def run_mile(cfg: MileConfig, *, resume: bool = False, overwrite: bool = False,
             log: Callable[[str], None] = print) -> Path:
    """Train this process's members, sample each, merge; returns the ensemble directory."""
    import torch

    from rtllm.run.chains import Launch, rank_device, run_chain, start_ranks
    from rtllm.run.merge import chain_dir, merge
    from rtllm.lm.data import TokenData, context_length, read_texts
    from rtllm.lm.model_io import load_tokenizer, resolve_device
    from rtllm.lm.presets import config_for

    s = cfg.sampling
    out = s.out_dir
    launch = Launch.from_env()

    def holds_no_other_run(resume: bool, overwrite: bool) -> None:
        if out.is_dir() and any(out.iterdir()) and not (resume or overwrite) and \
                not (out / MEMBERS).is_dir():
            raise ValueError(f"--out {out} is not empty and holds no MILE run; choose another directory")

    resume, overwrite = start_ranks(out, launch, {"mile": dataclasses.asdict(cfg)}, resume=resume,
                                    overwrite=overwrite, check=holds_no_other_run)
    device = resolve_device(rank_device(s.device, launch))
    log(f"MILE: {cfg.members} members" + (f"; {MINIBATCH_WARNING}" if s.sampler == "mclmc" else
                                          ", each the start of a ray-tracing chain"))
    mine = _my_members(cfg.members, launch)
    if not mine:
        log(f"rank {launch.rank}: no member to run ({cfg.members} members, {launch.world_size} ranks)")
        return out
    tokenizer = load_tokenizer(Path(s.model), f"tokenizer.save_pretrained({s.model!r})")
    data = TokenData.from_texts(tokenizer, read_texts(s.train, s.encoding),
                                heldout=read_texts(s.heldout, s.encoding) if s.heldout else None,
                                seq_len=s.seq_len, context=context_length(config_for(s.model)))
    for k in mine:
        say = (lambda m, k=k: log(f"[member {k}] {m}"))
        mdir = member_dir(out, k)
        train_member(s.model, data, mdir, member=k, seed=s.seed, settings=cfg.training, device=device,
                     reuse=not overwrite, log=say)
        ccfg = dataclasses.replace(s, chain=k, init=str(mdir), out=str(chain_dir(out, k)),
                                   device=str(device))
        run_chain(ccfg, expected_chains=list(range(cfg.members)), resume=resume, overwrite=overwrite, log=say)
        del ccfg
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = merge(out, verify=False)  # each sample was verified by re-reading when written
    log(report.summary())
    return out
